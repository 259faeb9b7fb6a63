"""Error against wall time, Gauss–Newton against NTK-weighted Adam: the table and the plot of ``docs/results.md``.

Reads the curves the examples write with ``--out`` (``examples/kovasznay_2d.py``, ``examples/poisson_2d.py``,
the time-dependent examples with ``--seconds``), groups them by example and optimizer, and prints per group the
error of every seed at a few wall times and at the end (median and range); with matplotlib, one panel per
example: the median curve and the range over seeds, error (log) against seconds.

    python benchmarks/gauss_newton_curves.py benchmarks/results/gauss_newton --plot docs/images/gauss_newton.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(folder: Path) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        groups.setdefault((run["example"], run["optimizer"]), []).append(run)
    return groups


def error_at(curve: list[dict], seconds: float) -> float | None:
    """The last recorded error at or before ``seconds`` of training (``None`` before the first record)."""
    seen = [p["error"] for p in curve if p["seconds"] <= seconds + 1e-6]
    return seen[-1] if seen else None


def table(groups: dict[tuple[str, str], list[dict]], marks: list[float]) -> str:
    lines = [f"{'example':<14} {'optimizer':<13} {'seeds':>5} " + " ".join(f"{f'{m:g} s':>9}" for m in marks)]
    lines[0] += f" {'end (median, range)':>34} {'steps':>7}"
    for (example, optimizer), runs in sorted(groups.items()):
        cells = []
        for m in marks:
            values = [e for e in (error_at(r["curve"], m) for r in runs) if e is not None]
            cells.append(f"{statistics.median(values):9.2e}" if values else f"{'':>9}")
        ends = [r["curve"][-1]["error"] for r in runs]
        steps = statistics.median(r["curve"][-1]["step"] for r in runs)
        end = f"{statistics.median(ends):.2e} ({min(ends):.2e}–{max(ends):.2e})"
        lines.append(f"{example:<14} {optimizer:<13} {len(runs):>5} " + " ".join(cells) + f" {end:>34} {steps:>7.0f}")
    return "\n".join(lines)


def plot(groups: dict[tuple[str, str], list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = sorted({example for example, _ in groups})
    columns = min(3, len(examples))
    rows = -(-len(examples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    colors = {"adam": "tab:blue", "gauss_newton": "tab:orange", "soap": "tab:green"}
    for ax in axes.flat[len(examples) :]:
        ax.set_visible(False)
    for ax, example in zip(axes.flat, examples, strict=False):
        for (name, optimizer), runs in sorted(groups.items()):
            if name != example:
                continue
            grid = sorted({round(p["seconds"]) for r in runs for p in r["curve"]})
            rows = [[error_at(r["curve"], t) for r in runs] for t in grid]
            keep = [(t, [v for v in row if v is not None]) for t, row in zip(grid, rows, strict=True)]
            keep = [(t, row) for t, row in keep if len(row) == len(runs)]
            ts = [t for t, _ in keep]
            label = f"{optimizer} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
            color = colors.get(optimizer)
            ax.plot(ts, [statistics.median(row) for _, row in keep], label=label, color=color)
            ax.fill_between(ts, [min(r) for _, r in keep], [max(r) for _, r in keep], alpha=0.25, color=color)
        ax.set(yscale="log", xlabel="training time [s], one CPU thread", ylabel="relative L² error", title=example)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--marks", nargs="+", type=float, default=[30, 60, 120, 300, 600])
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    groups = load(args.folder)
    text = table(groups, args.marks)
    print(text)
    if args.plot is not None:
        plot(groups, args.plot)
        print(f"plot: {args.plot}")
    return text


if __name__ == "__main__":
    main()
