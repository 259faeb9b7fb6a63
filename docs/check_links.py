"""Fail if a page of the built site links to a file or an anchor that does not exist.

``python docs/check_links.py docs/_build/html`` (run by ``make docs`` after Sphinx). Sphinx's own
``-W`` does not see these: viewcode's "[docs]" back-links and Markdown links to headings are plain
``href``s once written.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path


def dead_links(root: Path) -> list[tuple[str, str, str]]:
    anchors: dict[Path, set[str]] = {}

    def ids(page: Path) -> set[str]:
        if page not in anchors:
            text = page.read_text(errors="ignore")
            anchors[page] = set(re.findall(r'\bid="([^"]+)"', text)) | set(re.findall(r'\bname="([^"]+)"', text))
        return anchors[page]

    dead = set()
    for page in sorted(root.rglob("*.html")):
        for href in re.findall(r'href="([^"]+)"', page.read_text(errors="ignore")):
            href = html.unescape(href)
            if re.match(r"^[a-z][a-z0-9+.-]*:", href):  # http:, mailto:, javascript:, ...
                continue
            path, _, fragment = href.partition("#")
            path = path.split("?")[0]
            target = page if not path else (page.parent / path).resolve()
            where = str(page.relative_to(root))
            if not target.exists():
                dead.add((where, href, "no such file"))
            elif fragment and target.suffix == ".html" and fragment not in ids(target):
                dead.add((where, href, "no such anchor"))
    return sorted(dead)


if __name__ == "__main__":
    found = dead_links(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/_build/html"))
    for where, href, why in found:
        print(f"{where}: {href} ({why})")
    print(f"{len(found)} dead links")
    sys.exit(1 if found else 0)
