"""Pixel against latent diffusion at 64x64, the same CPU budget for each (issue 29, point 4).

Both models are trained by `unnoise train` on the same folder with the same recipe (the shipped
`emoji-64`'s: batch 64, AdamW at 5e-4 with 200 warm-up steps and a linear decay over the last 30%,
log-normal noise levels with mean -0.6, the first-last text tokens, the same held-out concepts), each for
as many steps as its measured training speed fits in `--minutes` of wall time on this CPU:

- `pixel-64`: the small-p2q UNet on 64x64 pixels folded 4x4 into 16x16 positions (12.4M parameters);
- `latent-small`: the same UNet on the autoencoder's 16x16x4 latents (12.3M parameters).

The two networks cost the same per position, so the comparison asks what the autoencoder buys: the
latent model's steps are cheaper (no 48-channel stem and head at full size) and its targets are smoother.
The autoencoder's own training time is reported beside the table, not charged to the latent model's
budget: it is trained once per kind of picture and reused, as Stable Diffusion's VAE is (charge it
yourself by giving the pixel model `--minutes` plus the autoencoder's minutes).

Each release is then judged by `unnoise eval folder` with the same judge, captions and seeds. Runs keep
their state under `--runs` (outside the checkout) and resume when started again.

Run: .venv/bin/python benchmarks/pixel_vs_latent.py --data ../shared/datasets/emoji-noto-64 \
         --autoencoder AE --runs /tmp/pixel-vs-latent [--minutes 30] [--captions 200] [--guidance 3]
Writes benchmarks/results/pixel_vs_latent.md and .json.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PRESETS = ("pixel-64", "latent-small")
BATCH = 64
UNNOISE = str(Path(sys.executable).with_name("unnoise"))  # the command of this environment
RECIPE = [
    "--text-token-layers", "first-last", "--held-out", "0.1", "--batch-size", str(BATCH), "--lr", "5e-4",
    "--warmup-steps", "200", "--lr-decay-fraction", "0.3", "--sigma-p-mean", "-0.6", "--log-every", "25",
    "--checkpoint-every", "250", "--sample-every", "0",
]  # fmt: skip


def images_per_second(preset: str, data: str, autoencoder: str) -> float:
    """The training speed `benchmarks/train_64.py` measures, in a fresh process."""
    command = [
        sys.executable, str(Path(__file__).with_name("train_64.py")), "--worker", preset, "--data", data,
        "--autoencoder", autoencoder, "--batch", str(BATCH), "--steps", "4", "--warmup", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return BATCH / statistics.median(json.loads(done.stdout.strip().splitlines()[-1]))


def train(preset: str, steps: int, args: argparse.Namespace) -> Path:
    out = Path(args.runs) / preset
    command = [UNNOISE, "train", "--out", str(out), "--steps", str(steps)]
    command += ["--ema-half-life", str(steps * BATCH // 10)]  # a tenth of the images seen
    if (out / "config.json").exists():
        command += ["--resume"]
    else:
        command += ["--data", args.data, "--preset", preset, *RECIPE]
        if preset.startswith("latent"):
            command += ["--autoencoder", args.autoencoder]
    with open(out.with_suffix(".log"), "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out


def wall_minutes(run: Path) -> tuple[float, float]:
    """(minutes of training summed over logged windows, median images/s) from the run's log.csv."""
    with open(run / "log.csv") as file:
        rows = list(csv.DictReader(file))
    steps = [0] + [int(r["step"]) for r in rows]  # each row: the window since the row before
    windows = zip(itertools.pairwise(steps), rows, strict=True)
    seconds = sum(BATCH * (b - a) / float(row["images_per_s"]) for (a, b), row in windows)
    return seconds / 60, statistics.median(float(r["images_per_s"]) for r in rows)


def judge(run: Path, args: argparse.Namespace) -> dict:
    report = run.with_name(run.name + "-eval.json")
    if not report.exists():
        command = [
            UNNOISE, "eval", "folder", "--model", str(run / "model"), "--data", args.data,
            "--captions", str(args.captions), "--guidance", str(args.guidance), "--report", str(report),
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())


def autoencoder_training(autoencoder: str) -> str:
    config = json.loads((Path(autoencoder) / "config.json").read_text())
    training = config.get("training", {})
    return f"{training.get('images_seen', '?')} images"


def table(rows: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"# Pixel against latent at 64x64: {args.minutes:g} minutes of training each"
        f" ({platform.processor() or platform.machine()}, 2 cores)",
        "",
        f"Data: {Path(args.data).name}; judged by `unnoise eval folder` ({args.captions} captions per side,"
        f" guidance {args.guidance:g}, 20 steps). Lower FD and KID are better; text alignment is the fraction"
        " of the way from shuffled captions (0) to real images (1). The autoencoder"
        f" ({autoencoder_training(args.autoencoder)} of its own training) is not charged to the latent"
        " model.",
        "",
        "| | pixel-64 | latent-small | latent / pixel |",
        "|---|---:|---:|---:|",
    ]
    p, q = rows["pixel-64"], rows["latent-small"]

    def line(name: str, a: float, b: float, ratio: bool = True, digits: int = 3) -> None:
        said = f"{b / a:.2f}x" if ratio and a else ""
        lines.append(f"| {name} | {a:.{digits}f} | {b:.{digits}f} | {said} |")

    line("training minutes", p["minutes"], q["minutes"], digits=1)
    line("images/s (median)", p["images_per_s"], q["images_per_s"], digits=1)
    line("steps of 64", p["steps"], q["steps"], digits=0)
    for side in ("train", "held_out"):
        a, b = p["report"][side], q["report"][side]
        line(f"{side}: text alignment", a["text_alignment"]["fraction"], b["text_alignment"]["fraction"])
        line(f"{side}: FD", a["fd"], b["fd"])
        line(f"{side}: KID", a["kid"], b["kid"], digits=4)
        for name in ("precision", "recall", "density", "coverage", "near_copies"):
            line(f"{side}: {name}", a[name], b[name], ratio=False)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--autoencoder", required=True, help="a 64x64 autoencoder release")
    parser.add_argument("--runs", required=True, help="where the two runs keep their state (resumable)")
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall time of each model")
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=3.0)
    args = parser.parse_args()
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    rows = {}
    speeds = {preset: images_per_second(preset, args.data, args.autoencoder) for preset in PRESETS}
    for preset in PRESETS:  # both speeds measured first, back to back, before any training
        speed = speeds[preset]
        steps = max(250, round(args.minutes * 60 * speed / BATCH))
        said = f"{speed:.1f} images/s measured -> {steps} steps in {args.minutes:g} minutes"
        print(f"{preset}: {said}", flush=True)
        run = train(preset, steps, args)
        minutes, median_speed = wall_minutes(run)
        rows[preset] = {"steps": steps, "minutes": minutes, "images_per_s": median_speed}
        rows[preset]["report"] = judge(run, args)
        print(f"{preset}: trained {minutes:.1f} minutes, judged", flush=True)
    text = table(rows, args)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pixel_vs_latent.md").write_text(text)
    (RESULTS / "pixel_vs_latent.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
