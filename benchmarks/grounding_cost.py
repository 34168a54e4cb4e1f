"""What token grounding costs a training step: images/s with and without `--grounding-weight`.

Each configuration builds the training `Run` that `unnoise train --data shapes` builds (the same network,
optimizer, EMA, data and text encoder), fills its caption cache with the data set's captions first (a long
run reaches that steady state within a few thousand steps: the built-in shapes have a few thousand distinct
captions), then times whole steps: the micro-batch (drawing the images and, grounded, the word masks),
forward with the loss, backward, gradient clipping, AdamW and the EMA update. Median of `--steps` steps
after `--warmup`. The baseline is the same step without grounding, measured in the same run; each
configuration runs in its own process, one after another, in `--rounds` interleaved rounds (a shared
machine's speed drifts by more than grounding costs: the table gives each configuration's median over the
rounds, and its lowest and highest).

Run: .venv/bin/python benchmarks/grounding_cost.py [--preset small-p2q] [--batches 32,64]
Writes benchmarks/results/grounding_cost.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"

# name -> the TrainConfig fields it sets beyond the common ones
CONFIGURATIONS: dict[str, dict] = {
    "plain": {},
    "grounded": {"grounding_weight": 0.1},
    "grounded, places and numbers": {"grounding_weight": 0.1, "ground_places": True, "ground_numbers": True},
}


def time_steps(preset: str, batch: int, fields: dict, steps: int, warmup: int, out: str) -> list[float]:
    """Seconds of each timed training step of one configuration, in this process."""
    from unnoise.data.shapes import sample_scene
    from unnoise.train.config import TrainConfig
    from unnoise.train.distributed import init_distributed
    from unnoise.train.loop import Run

    config = TrainConfig(
        data="shapes", preset=preset, text_token_layers="first-last", batch_size=batch, sigma_p_mean=0.0,
        sample_every=0, out=out, **fields,
    ).validate()  # fmt: skip
    run = Run(config, init_distributed("cpu"))
    mix = run.source.dataset.mix
    captions = {sample_scene(config.seed, i, run.network_config.resolution, mix)[1] for i in range(20_000)}
    run.text.precompute([*captions, ""], progress=False)
    batches = run.micro_batches(0)
    seconds = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        run.step(batches, step)
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


def measure(args, name: str, batch: int) -> float:
    """Median images/s of one configuration, in a fresh process (no allocator or cache carried over)."""
    command = [
        sys.executable, __file__, "--worker", name, "--preset", args.preset, "--batches", str(batch),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} at batch {batch} failed:\n{done.stderr[-3000:]}")
    seconds = json.loads(done.stdout.strip().splitlines()[-1])
    return batch / statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-p2q")
    parser.add_argument("--batches", default="32,64", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every configuration")
    parser.add_argument("--out", default=str(RESULTS / "grounding_cost"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            seconds = time_steps(
                args.preset, batches[0], CONFIGURATIONS[args.worker], args.steps, args.warmup, out
            )
        print(json.dumps(seconds))
        return

    rates: dict[tuple[int, str], list[float]] = {(b, name): [] for b in batches for name in CONFIGURATIONS}
    for round_ in range(args.rounds):
        for (batch, name), seen in rates.items():
            seen.append(measure(args, name, batch))
            print(f"round {round_ + 1}, batch {batch}, {name}: {seen[-1]:.1f} images/s", flush=True)
    rows = []
    for (batch, name), seen in rates.items():
        median, plain = statistics.median(seen), statistics.median(rates[batch, "plain"])
        rows.append({
            "batch": batch, "configuration": name, "images_per_s": median, "lowest": min(seen),
            "highest": max(seen), "ratio": median / plain, "rounds": seen,
        })  # fmt: skip

    lines = [
        "# Grounding cost: training images/s with and without token grounding",
        "",
        f"`{args.preset}` at batch sizes {args.batches}, bf16 where native; a whole training step (data,"
        f" forward, backward, AdamW, EMA) with the caption cache warm; median of {args.steps} steps after"
        f" {args.warmup}; the median of {args.rounds} interleaved rounds."
        f" {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch"
        f" {torch.__version__}. Baseline: the same step without grounding, in the same run.",
        "",
        "| batch | configuration | images/s | lowest - highest | vs plain |",
        "|---:|---|---:|---:|---:|",
        *(
            f"| {r['batch']} | {r['configuration']} | {r['images_per_s']:.1f} | {r['lowest']:.1f} -"
            f" {r['highest']:.1f} | {r['ratio']:.2f}x |"
            for r in rows
        ),
        "",
    ]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
