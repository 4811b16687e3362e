"""What every recipe resolves to: ``train.py fit --config RECIPE --print_config`` for each recipe in configs/, one file
each, and the difference from another tree's (e.g. before a change to the recipes or their shared defaults).

    python benchmarks/print_config.py /tmp/print_config/after                           # this tree's
    python benchmarks/print_config.py /tmp/print_config/after --compare /tmp/print_config/before

Run it from the tree whose recipes it should print (it imports that tree's ``train``). All recipes print in one
process: the imports, which dominate one ``--print_config``, happen once. Exit status 1 when a recipe differs.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402


def recipes() -> list[Path]:
    """The recipes: configs/*.yaml (configs/defaults/, trainer/ and callbacks/ hold pieces, not recipes)."""
    return sorted((ROOT / "configs").glob("*.yaml"))


def printed(recipe: Path) -> str:
    """What ``fit --config RECIPE --print_config`` writes (the path as a user gives it, relative to the tree)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        train.main(["fit", "--config", str(recipe.relative_to(ROOT)), "--print_config"])
    return out.getvalue()


def compare(before: Path, after: Path) -> list[str]:
    """One unified diff per recipe whose printed config differs (a recipe missing on one side counts as empty)."""
    diffs = []
    for name in sorted({p.name for p in before.glob("*.yaml")} | {p.name for p in after.glob("*.yaml")}):
        old, new = (d / name for d in (before, after))
        a = old.read_text().splitlines(keepends=True) if old.exists() else []
        b = new.read_text().splitlines(keepends=True) if new.exists() else []
        diffs.append("".join(difflib.unified_diff(a, b, str(old), str(new))))
    return [d for d in diffs if d]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for <recipe>.yaml files")
    ap.add_argument("--compare", type=Path, help="folder of another tree's printed recipes to diff against")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(ROOT)  # contextlib.chdir is Python 3.11+; the project supports 3.10
    try:
        for recipe in recipes():
            (args.out / f"{recipe.stem}.yaml").write_text(printed(recipe))
    finally:
        os.chdir(here)
    if args.compare is None:
        return 0
    diffs = compare(args.compare, args.out)
    sys.stdout.write("".join(diffs) or "every recipe prints the same config\n")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
