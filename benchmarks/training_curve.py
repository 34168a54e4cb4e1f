"""Accuracy against training images for one run: each saved release judged as time_to_quality.py judges.

A long `unnoise train` run writes its release (EMA weights) to OUT/model at every checkpoint; copies of it
taken along the way (any folders holding a release, e.g. snapshots/step-2000) become the points of the
curve. Each is judged with the quick ShapesEval and the position confusion matrix of time_to_quality.py,
same prompts, seeds and sampler, so the points compare with that table; and with the position-word test
(`unnoise.eval.positions.position_word_test`: how often the true caption denoises a training image better
than the caption with its position word mirrored, at sigma 4 where the layout is decided; chance 50%).
`--words-only` runs only that test: about 30 s a point on one core, to watch a run as it trains.

Run: .venv/bin/python benchmarks/training_curve.py SNAPSHOT [SNAPSHOT ...] [--out FILE]
Writes benchmarks/results/training_curve.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from time_to_quality import judge

from unnoise.eval.positions import position_word_test
from unnoise.pipeline import load

WORDS_SIGMA = "4.0"  # the noise level of the position-word test in the table


def words_summary(words: dict) -> str:
    """'horizontal 52% (gap +0.1%) ... ' at every noise level of the test."""
    return "; ".join(
        f"{axis} " + ", ".join(f"s{k} {v['preferred']:.0%} ({v['gap']:+.1%})" for k, v in by_sigma.items())
        for axis, by_sigma in words.items()
    )


RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("releases", nargs="+", help="release folders (with config.json), in training order")
    parser.add_argument("--prompts", type=int, default=12, help="ShapesEval prompts per category")
    parser.add_argument("--samples", type=int, default=2, help="images per ShapesEval prompt")
    parser.add_argument("--cell-samples", type=int, default=8, help="images per grid cell")
    parser.add_argument("--title", default="", help="what the run is, for the table's heading")
    parser.add_argument("--words-only", action="store_true", help="only the position-word test (fast)")
    parser.add_argument("--out", default=str(RESULTS / "training_curve"))
    parser.add_argument(
        "--extend", action="store_true", help="keep the points already in OUT.json; judge only the new ones"
    )
    args = parser.parse_args()
    command = " ".join([".venv/bin/python", *sys.argv])
    points = earlier_points(Path(args.out)) if args.extend else []
    judged = {p["release"] for p in points}
    for folder in map(Path, args.releases):
        if str(folder) in judged:
            continue
        training = json.loads((folder / "config.json").read_text())["training"]
        result = {"words": position_word_test(load(folder))}
        if args.words_only:
            print(f"{folder}: {training['steps']} steps, {words_summary(result['words'])}", flush=True)
            continue
        result |= judge(folder, args.prompts, args.samples, args.cell_samples)
        result.pop("position_table")
        point = {"release": str(folder), "command": command, **training, **result}
        points.append(point)
        print(json.dumps({k: v for k, v in point.items() if k not in ("positions", "words")}), flush=True)
    if args.words_only:
        return
    points.sort(key=lambda p: p["steps"])
    commands = "\n".join(f"- `{c}`" for c in dict.fromkeys(p["command"] for p in points))
    lines = [
        f"# Training curve{': ' + args.title if args.title else ''}",
        "",
        f"ShapesEval {args.prompts} prompts x {args.samples} images per category, positions"
        f" {args.cell_samples} images per cell, 20 steps, guidance 3. The points were judged by:",
        "",
        commands,
        "",
        "| release | step | images | single | two | count | binding | horizontal | vertical"
        " | placed horizontal | placed vertical | words h | words v |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        c, pos = p["categories"], p["positions"]
        lines.append(
            f"| {short_name(p['release'])} | {p['steps']} | {p['images_seen']:,} |"
            f" {c['single']:.0%} | {c['two_objects']:.0%} |"
            f" {c['counting']:.0%} | {c['binding']:.0%} | {pos['horizontal']:.0%} | {pos['vertical']:.0%} |"
            f" {pos['placement_horizontal']:.0%} | {pos['placement_vertical']:.0%} |"
            f" {p['words']['horizontal'][WORDS_SIGMA]['preferred']:.0%} |"
            f" {p['words']['vertical'][WORDS_SIGMA]['preferred']:.0%} |"
        )
    lines += [
        "",
        f"words h / v: the position-word test at sigma {WORDS_SIGMA}, how often the true caption denoises"
        " a training image better than the one with its left/right (top/bottom) word mirrored; chance 50%.",
    ]
    print("\n".join(lines))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(points, indent=1))


def short_name(release: str) -> str:
    """The release folder's last two parts ("snaps/step-2000", "decay-11250/model"): which run and when."""
    return "/".join(Path(release).parts[-2:])


def earlier_points(out: Path) -> list[dict]:
    """The points of OUT.json, each with the command that judged it (older files name it in OUT.md)."""
    path = out.with_name(out.name + ".json")
    if not path.is_file():
        return []
    points = json.loads(path.read_text())
    markdown = out.with_name(out.name + ".md")
    header = markdown.read_text().split("`")[1] if markdown.is_file() else "an earlier run of this script"
    return [{"command": header, **p} for p in points]


if __name__ == "__main__":
    main()
