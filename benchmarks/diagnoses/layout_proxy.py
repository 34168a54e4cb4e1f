"""How soon does a recipe learn where things go? A 15-minute proxy for issue 11's layout question.

Each recipe trains at 16x16 on single objects whose every caption names the position ("a red circle in the
top left": `--shapes-mix single=1,relation=0,count=0,binding=0,position=1`), batch 32, one thread per
recipe, two recipes at a time. Every checkpoint's raw weights then take the position-word test
(`unnoise.eval.positions.position_word_test`): how often the true caption denoises a training image
better than the caption with its left/right (top/bottom) word mirrored (chance 50%), at sigma 0.5 to 4;
the tables read sigma 4, where the layout is decided: the first checkpoint at which each axis reaches 90%,
and the whole curve. Needs no sampling, so a recipe costs its training time and seconds per point.
`--judge-only` judges the checkpoints already in --workdir/RECIPE (runs made by hand with the same flags).

Run: .venv/bin/python benchmarks/diagnoses/layout_proxy.py [--recipes small-p2,small-p2q] [--steps 1500]
Writes benchmarks/diagnoses/results/layout_proxy.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PROXY_DATA = [
    "--data",
    "shapes",
    "--resolution",
    "16",
    "--shapes-mix",
    "single=1,relation=0,count=0,binding=0,position=1",
]
COMMON = [
    *PROXY_DATA, "--batch-size", "32", "--lr", "5e-4", "--sigma-p-mean", "-0.6", "--warmup-steps", "50",
    "--log-every", "25", "--sample-every", "0", "--checkpoint-every", "250", "--keep-checkpoints", "1000",
]  # fmt: skip

# name -> (what it is, `unnoise train` flags)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "small-p2": ("UNet on 2x2-folded pixels, positions after the stem", ["--preset", "small-p2"]),
    "small-p2-fl": (
        "... cross-attention reads MiniLM's first and last layers",
        ["--preset", "small-p2", "--text-token-layers", "first-last"],
    ),
    "small-p2q": (
        "small-p2 with fractional positions in the cross-attention queries",
        ["--preset", "small-p2q"],
    ),
    "small-p2q-fl": (
        "... and cross-attention reads MiniLM's first and last layers",
        ["--preset", "small-p2q", "--text-token-layers", "first-last"],
    ),
    "small": ("the shipped shapes-32's UNet (no positions)", ["--preset", "small"]),
}


def train(names: list[str], steps: int, workdir: Path) -> None:
    """Two recipes at a time, one thread each (a finished run is skipped, a killed one resumes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for pair in (names[i : i + 2] for i in range(0, len(names), 2)):
        running = []
        for name in pair:
            out = workdir / name
            if (out / f"state-{steps:08d}").is_dir():
                continue
            command = [sys.executable, "-m", "unnoise", "train", *COMMON, *RECIPES[name][1]]
            command += ["--steps", str(steps), "--out", str(out)] + (["--resume"] if out.is_dir() else [])
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "train.out", "a")  # noqa: SIM115  (closed below)
            running.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        for process, log in running:
            if process.wait() != 0:
                sys.exit(f"training failed: see {log.name}")
            log.close()


def curve(run: Path) -> list[dict]:
    """The position-word test on every checkpoint's raw (not EMA) weights."""
    from safetensors.torch import load_file

    from unnoise.eval.positions import position_word_test
    from unnoise.pipeline import load

    pipe, points = load(run / "model"), []
    for state in sorted(run.glob("state-*")):
        weights = load_file(state / "model.safetensors")
        pipe.denoiser.network.load_state_dict({k: v.float() for k, v in weights.items()})
        words = position_word_test(pipe, samples=96)
        step = int(state.name.split("-")[1])
        points.append({"step": step, "images": step * 32, "words": words})
        print(run.name, step, json.dumps(words), flush=True)
    return points


def first_reaching(points: list[dict], axis: str, level: float = 0.9) -> str:
    hit = next((p for p in points if p["words"][axis]["4.0"]["preferred"] >= level), None)
    return f"{hit['images']:,}" if hit else "not yet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="small-p2,small-p2q,small-p2q-fl,small")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per recipe (32 images each)")
    parser.add_argument("--workdir", default="/tmp/unnoise-layout-proxy")
    parser.add_argument("--out", default=str(RESULTS / "layout_proxy"))
    parser.add_argument(
        "--judge-only", action="store_true", help="only judge the checkpoints already in --workdir/RECIPE"
    )
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    workdir = Path(args.workdir)
    if not args.judge_only:
        train(names, args.steps, workdir)
    torch.set_num_threads(1)
    results = {name: curve(workdir / name) for name in names}
    lines = [
        "# Layout proxy: how soon a recipe learns where things go",
        "",
        f"`{' '.join(['.venv/bin/python', *sys.argv])}`: 16x16, single objects whose captions all name the"
        " position, batch 32, one thread per recipe; the position-word test on each checkpoint's raw weights"
        " (96 images; chance 50%).",
        "",
        "| recipe | what | images until horizontal >= 90% | images until vertical >= 90% |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {n} | {RECIPES[n][0]} | {first_reaching(results[n], 'horizontal')} |"
        f" {first_reaching(results[n], 'vertical')} |"
        for n in names
    ]
    lines += ["", "Curves (sigma 4: horizontal / vertical preferred):", ""]
    steps = sorted({p["step"] for points in results.values() for p in points})
    lines += ["| images | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for step in steps:
        cells = []
        for n in names:
            point = next((p for p in results[n] if p["step"] == step), None)
            w = point and point["words"]
            cells.append(
                f"{w['horizontal']['4.0']['preferred']:.0%} / {w['vertical']['4.0']['preferred']:.0%}"
                if w
                else ""
            )
        lines.append(f"| {step * 32:,} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
