"""Cost sentences in the README and the docs say what they were measured on (issue 30: "about one to two
training steps in any residual style" was false for a two-component residual at the time)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs/index.md", *sorted((ROOT / "docs/guides").glob("*.md"))]


def sentences(text: str) -> list[str]:
    return [s.replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]


def test_no_cost_claim_is_made_for_every_residual_style_or_shape():
    for page in PAGES:
        for sentence in sentences(page.read_text()):
            if "training step" in sentence:
                assert "in any residual style" not in sentence, (page.name, sentence)


def test_the_readme_cost_of_exact_traces_names_its_scope_and_benchmark():
    text = (ROOT / "README.md").read_text()
    claim = [s for s in sentences(text) if "one to two training steps" in s]
    assert claim
    for sentence in claim:
        assert "two-component" in sentence, sentence
    paragraph = text[text.index("one to two training steps") :][:1200]
    assert "benchmarks/exact_cost.py" in paragraph and "per output component" in paragraph
