"""What a ShapesEval report gets wrong, from its per-image details: single objects by what the prompt
names, counting by the number asked for, and why scenes of two objects fail.

Run: .venv/bin/python benchmarks/diagnoses/shapes_eval_breakdown.py REPORT.json [REPORT.json ...]
(REPORT: `unnoise eval shapes --report`, e.g. src/unnoise/models/shapes-32/shapes_eval.json). Prints one
Markdown table with a column per report; no model is run.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def single_kind(prompt: dict) -> str:
    named = [k for k in ("size", "position") if prompt["objects"][0][k] is not None]
    return "single: " + (" and ".join(named) if named else "colour and shape only")


def why_wrong(details: dict, wanted: int) -> str:
    """The first reason a scene of several objects fails, in the judge's order."""
    if details["missing"] and details["extra"]:
        return (
            "an object wrong (shape or colour swapped)"
            if len(details["found"]) == wanted
            else "objects wrong and the count off"
        )
    if details["extra"]:
        return "extra objects"
    if details["missing"]:
        return "objects missing"
    return "relation wrong"


def breakdown(report: dict) -> dict[str, tuple[int, int]]:
    """Row name -> (correct, images)."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add(name: str, ok: bool) -> None:
        rows[name][0] += ok
        rows[name][1] += 1

    for prompt in report["prompts"]:
        category, wanted = prompt["category"], len(prompt["objects"])
        for ok, details in zip(prompt["correct"], prompt["details"], strict=True):
            if category == "single":
                add(single_kind(prompt), ok)
            elif category == "counting":
                add(f"counting: {wanted}", ok)  # a counting prompt lists its object once per copy
            else:
                name = "two objects" if category == "two_objects" else "binding"
                add(f"{name}: right" if ok else f"{name} failing: {why_wrong(details, wanted)}", True)
    return {k: (v[0], v[1]) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    args = parser.parse_args()
    tables = {}
    for path in args.reports:
        try:
            tables[str(path)] = breakdown(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            parser.error(f"{path} is not a readable ShapesEval report ({error})")
    names = sorted({row for table in tables.values() for row in table})
    print("| | " + " | ".join(tables) + " |")
    print("|---" + "|---:" * len(tables) + "|")
    for row in names:
        cells = []
        for table in tables.values():
            correct, images = table.get(row, (0, 0))
            if row.startswith(("two objects", "binding")):  # images, by outcome
                cells.append(str(images))
            else:
                cells.append(f"{correct / images:.0%} ({correct} / {images})" if images else "-")
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
