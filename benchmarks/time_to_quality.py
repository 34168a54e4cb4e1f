"""Time to quality: training recipes on the built-in shapes, the same image budget each, judged the same way.

Each recipe is an `unnoise train` command (a preset and training flags) run in its own process for
`--images` training images, one recipe after another. Then each released model is judged with a quick
ShapesEval (the first `--prompts` prompts of each category, `--samples` images each) and the position
confusion matrix (`unnoise.eval.positions`: one prompt per grid cell, `--cell-samples` images each,
horizontal and vertical accuracy apart). All with DPM-Solver++(2M), 20 steps, guidance 3. The first recipe,
`baseline`, is the recipe the shipped model was trained with (the `small` UNet, constant learning rate,
EDM's training noise levels), measured in the same run; every row gives its ratios to it.

Runs live in `--workdir` (default /tmp/unnoise-ttq, outside the checkout): a recipe whose run is complete
is not trained again, a killed one resumes (`unnoise train --resume`), so the script can be re-run.

Run: .venv/bin/python benchmarks/time_to_quality.py [--images N] [--recipes a,b] [--workdir DIR]
Writes benchmarks/results/time_to_quality.md and .json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

BATCH = 32
COMMON = ["--data", "shapes", "--batch-size", str(BATCH), "--warmup-steps", "50", "--log-every", "25"]

# name -> (what it changes, `unnoise train` flags)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "baseline": ("the shipped recipe: small UNet, lr 2e-4 constant", ["--preset", "small", "--lr", "2e-4"]),
    "unet-pos": (
        "small UNet + 2-D positions + 2 text layers",
        ["--preset", "small-pos", "--lr", "2e-4"],
    ),
    "unet-pos-recipe": (
        "unet-pos, lr 3e-4 with a final decay, more high noise",
        ["--preset", "small-pos", "--lr", "3e-4", "--lr-decay-fraction", "0.2", "--sigma-p-mean", "-0.6"],
    ),
    "unet-p2": (
        "UNet on 2x2-folded pixels, positions, attention at every level",
        ["--preset", "small-p2", "--lr", "5e-4", "--sigma-p-mean", "-0.6"],
    ),
    "dit-p4": (
        "transformer, 4x4 patches, text in the sequence",
        ["--preset", "dit-p4", "--lr", "3e-4", "--sigma-p-mean", "-0.6"],
    ),
    "dit": (
        "transformer, 2x2 patches, text in the sequence",
        ["--preset", "dit-small", "--lr", "5e-4", "--lr-decay-fraction", "0.3", "--sigma-p-mean", "-0.6"],
    ),
}


def train_command(
    name: str, flags: list[str], steps: int, workdir: Path, every: int | None = None
) -> list[str] | None:
    """The command that trains (or resumes) one recipe, None when its run is complete."""
    out = workdir / name
    done = out / "model" / "config.json"
    if done.is_file() and json.loads(done.read_text())["training"]["steps"] >= steps:
        return None
    command = [sys.executable, "-m", "unnoise", "train", *COMMON, *flags, "--steps", str(steps)]
    every = every or max(1, steps // 8)
    command += ["--out", str(out), "--checkpoint-every", str(every), "--sample-every", "0"]
    if any(out.glob("state-*")):
        command.append("--resume")
    return command


def train_all(names: list[str], steps: int, workdir: Path, parallel: bool, every: int | None = None) -> None:
    """One process per recipe: one after another with every core, or all at once with a core share each
    (two torch processes that both use every core slow each other down many times over)."""
    commands = [c for n in names if (c := train_command(n, RECIPES[n][1], steps, workdir, every))]
    threads = max(1, (os.cpu_count() or 1) // len(commands)) if parallel and commands else None
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    running = []
    for command in commands:
        print(" ".join(command[1:]), flush=True)
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "train.out", "a")  # noqa: SIM115  (closed when the process is waited for)
        running.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        if not parallel:
            running[-1][0].wait()
    for process, log in running:
        if process.wait() != 0:
            sys.exit(f"training failed: see {log.name}")
        log.close()


def summary(name: str, workdir: Path) -> dict:
    """A finished recipe's wall time of training, images/s and last loss, from its log.csv."""
    out = workdir / name
    with open(out / "log.csv") as f:
        rows = list({int(r["step"]): r for r in csv.DictReader(f)}.values())  # a resumed run logs steps again
    seconds = sum(25 * BATCH / float(r["images_per_s"]) for r in rows)  # logged every 25 steps
    steps = int(rows[-1]["step"])
    return {
        "train_s": seconds,
        "images_per_s": steps * BATCH / seconds,
        "loss": sum(float(r["loss"]) for r in rows[-4:]) / len(rows[-4:]),
    }


def judge(model: Path, prompts: int, samples: int, cell_samples: int) -> dict:
    from unnoise.eval.positions import evaluate_positions
    from unnoise.eval.shapes_eval import run_shapes_eval
    from unnoise.pipeline import load

    started = time.perf_counter()
    report = run_shapes_eval(model, samples_per_prompt=samples, prompts_per_category=prompts)
    pipe = load(model)
    positions = evaluate_positions(
        lambda prompt, seed, n: pipe.generate(prompt, seed=seed, num_images=n), cell_samples
    )
    return {
        "categories": {k: v["accuracy"] for k, v in report.categories().items()},
        "overall": report.overall,
        "positions": positions.to_dict(),
        "position_table": positions.table(),
        "eval_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16_000, help="training images per recipe")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, baseline first")
    parser.add_argument("--workdir", default="/tmp/unnoise-ttq")
    parser.add_argument("--prompts", type=int, default=6, help="ShapesEval prompts per category")
    parser.add_argument("--samples", type=int, default=2, help="images per ShapesEval prompt")
    parser.add_argument("--cell-samples", type=int, default=4, help="images per grid cell")
    parser.add_argument("--out", default=str(RESULTS / "time_to_quality"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from --out's JSON")
    parser.add_argument(
        "--parallel", action="store_true", help="train the recipes at once, each on its share of the cores"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=None, help="steps (default: an eighth of the run)"
    )
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads(Path(args.out + ".json").read_text())
        results = saved["results"]
        for name, r in results.items():  # the confusion tables again, from the saved counts
            r["position_table"] = position_table(r["positions"])
            if (Path(args.workdir) / name / "log.csv").is_file():
                r |= summary(name, Path(args.workdir))
        write(results, args, saved["images"] // BATCH)
        return
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    steps = args.images // BATCH
    workdir = Path(args.workdir)
    train_all(names, steps, workdir, args.parallel, args.checkpoint_every)
    results = {name: summary(name, workdir) for name in names}
    for name in names:
        results[name] |= judge(workdir / name / "model", args.prompts, args.samples, args.cell_samples)
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "position_table"}), flush=True)
    write(results, args, steps)


def position_table(positions: dict) -> str:
    from unnoise.eval.positions import PositionReport

    report = PositionReport(images=positions["images"])
    for name in ("columns", "rows", "placed_columns", "placed_rows"):
        if name in positions:
            getattr(report, name)[:] = positions[name]
    return report.table()


def write(results: dict, args, steps: int) -> None:
    base = results[next(iter(results))]
    head = "| recipe | what | train time | images/s | loss | single | two | count | binding | overall |"
    head += " horizontal | vertical | placed horizontal | placed vertical | overall vs baseline |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        c = r["categories"]
        p = r["positions"]
        h, v = p["horizontal"], p["vertical"]
        ph, pv = p.get("placement_horizontal", float("nan")), p.get("placement_vertical", float("nan"))
        ratio = f"{r['overall'] / base['overall']:.2f}" if base["overall"] else "n/a (baseline 0%)"
        lines.append(
            f"| {name} | {RECIPES[name][0]} | {r['train_s'] / 60:.1f} min | {r['images_per_s']:.1f} |"
            f" {r['loss']:.4f} | {c['single']:.0%} | {c['two_objects']:.0%} | {c['counting']:.0%} |"
            f" {c['binding']:.0%} | {r['overall']:.0%} | {h:.0%} | {v:.0%} | {ph:.0%} | {pv:.0%} |"
            f" {ratio} |"
        )
    threads = (
        f"{max(1, (os.cpu_count() or 1) // len(results))} per recipe, in parallel"
        if args.parallel
        else "all, one recipe at a time"
    )
    text = [
        "# Time to quality",
        "",
        f"`{' '.join(['.venv/bin/python', *sys.argv])}`: {steps * BATCH:,} training images per recipe"
        f" (batch {BATCH}), ShapesEval {args.prompts} prompts x {args.samples} images per category, positions"
        f" {args.cell_samples} images per cell; threads: {threads}.",
        "",
        *lines,
        "",
        *(f"## {name}: position confusion\n\n{r['position_table']}" for name, r in results.items()),
    ]
    Path(args.out + ".md").write_text("\n".join(text) + "\n")
    Path(args.out + ".json").write_text(
        json.dumps(
            {"images": steps * BATCH, "recipes": {k: RECIPES[k] for k in results}, "results": results},
            indent=2,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
