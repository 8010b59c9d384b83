"""Copy the README's benchmark figures from the results files, so none is typed by hand.

Each ``<!-- figures:NAME -->...<!-- /figures -->`` block in README.md is replaced by the
``"readme"`` entry of ``benchmarks/results/NAME.json`` (a sentence, or a list of bullet lines),
as written by the benchmark script that produced NAME.json. ``--check`` changes nothing and
exits 1 when a block differs from its results file.

    python benchmarks/readme_figures.py [--check]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- figures:(\w+) -->)(.*?)(<!-- /figures -->)", re.S)


def figures(name: str) -> str | None:
    """The text a block named ``name`` should hold (None: the results file predates its ``readme`` entry)."""
    readme = json.loads((RESULTS / f"{name}.json").read_text()).get("readme")
    if readme is None:
        return None
    return readme if isinstance(readme, str) else "\n" + "\n".join(f"- {line}" for line in readme) + "\n"


def update(text: str) -> tuple[str, list[str], list[str]]:
    """(README text with every block refreshed, blocks that changed, blocks whose results lack figures)."""
    changed, missing = [], []

    def sub(m: re.Match) -> str:
        new = figures(m.group(2))
        if new is None:
            missing.append(m.group(2))
            return m.group(0)
        if new != m.group(3):
            changed.append(m.group(2))
        return m.group(1) + new + m.group(4)

    return BLOCK.sub(sub, text), changed, missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report blocks that differ; exit 1 if any")
    a = ap.parse_args(argv)
    readme = ROOT / "README.md"
    text, changed, missing = update(readme.read_text())
    for name in missing:
        print(f"benchmarks/results/{name}.json has no readme entry (written by an older script): regenerate it",
              file=sys.stderr)
    if a.check:
        for name in changed:
            print(f"README.md: figures:{name} differs from benchmarks/results/{name}.json", file=sys.stderr)
        return 1 if changed or missing else 0
    if changed:
        readme.write_text(text)
    print("updated: " + (", ".join(changed) or "nothing"))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
