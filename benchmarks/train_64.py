"""Training speed at 64x64 on a folder: the `large` pixel preset (issue 29's 5.3 images/s) against the
latent model (`latent-small` on a 64x64 autoencoder's 16x16x4 latents) and the pixel model of equal cost
(`pixel-64`: the same UNet on 64x64 pixels folded 4x4).

Each configuration builds the training `Run` that `unnoise train --data FOLDER` builds (for the latent
model with `--autoencoder`: the folder's latents are encoded once before timing, as a run caches them),
then times whole steps: the micro-batch, forward with the loss, backward, clipping, AdamW, EMA. Median of
`--steps` steps after `--warmup`, each configuration in a fresh process, one after another. The ratio is
against `large`, measured in the same run. Precision: the training loop's own choice (`--precision auto`).

Run: .venv/bin/python benchmarks/train_64.py --data ../shared/datasets/emoji-noto-64 --autoencoder AE
     [--batch 64] [--steps 4] [--warmup 1]
Writes benchmarks/results/train_64.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONFIGURATIONS = ("large", "pixel-64", "latent-small")


def time_steps(preset: str, data: str, autoencoder: str, batch: int, steps: int, warmup: int) -> list[float]:
    from unnoise.train.config import TrainConfig
    from unnoise.train.distributed import init_distributed
    from unnoise.train.loop import Run

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            data=data, preset=preset, batch_size=batch, sample_every=0, out=out, flip=True,
            autoencoder=autoencoder if preset.startswith("latent") else "", resolution=64,
        ).validate()  # fmt: skip
        run = Run(config, init_distributed("cpu"), log=lambda _: None)
        batches = run.micro_batches(0)
        seconds = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            run.step(batches, step)
            if step >= warmup:
                seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--autoencoder", required=True, help="a 64x64 autoencoder release")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        seconds = time_steps(args.worker, args.data, args.autoencoder, args.batch, args.steps, args.warmup)
        print(json.dumps(seconds))
        return

    rows = {}
    for preset in CONFIGURATIONS:
        command = [
            sys.executable, __file__, "--worker", preset, "--data", args.data,
            "--autoencoder", args.autoencoder, "--batch", str(args.batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{preset} failed:\n{done.stderr[-3000:]}")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])
        rows[preset] = args.batch / statistics.median(seconds)
        print(f"{preset}: {rows[preset]:.1f} images/s", flush=True)
    lines = [
        f"# Training at 64x64 ({platform.processor() or platform.machine()}, batch {args.batch},"
        f" median of {args.steps} steps)",
        "",
        "| preset | images/s | x large |",
        "|---|---:|---:|",
    ]
    lines += [f"| {p} | {r:.1f} | {r / rows['large']:.1f}x |" for p, r in rows.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_64.md").write_text(text)
    (RESULTS / "train_64.json").write_text(json.dumps({"batch": args.batch, "images_per_s": rows}, indent=1))


if __name__ == "__main__":
    main()
