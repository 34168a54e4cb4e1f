"""A LoRA as forward hooks or merged into the weights: seconds per step and peak memory on an SD 1.5-shaped
model (issue 32), against no LoRA, measured side by side.

The model is benchmarks/sd_speed.py's (SD 1.5's shapes, random weights, bf16 UNet and text encoder where the
CPU has native bf16); the LoRA is a random kohya-layout file of rank 16 on every attention projection and
proj_in/proj_out of the UNet and the text encoder's q/k/v (tests/sd_fixtures.lora_layers). Each mode runs in
its own process: load, apply, a 1-step warm-up, then `--steps` steps of DPM++ 2M at 512x512 with guidance
7.5; the step time is the median interval between step callbacks; peak memory the process's maximum
resident set; "apply s" the time `add_lora` took.

Run: .venv/bin/python benchmarks/lora_apply.py [--steps 3]   (builds the model first if sd_speed.py has not)
Writes benchmarks/results/lora_apply.md and .json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).parent / "results"


def one_mode(folder: Path, lora: Path, mode: str, steps: int, precision: str) -> dict:
    import unnoise

    pipe = unnoise.load(folder, device="cpu", precision=precision)
    started = time.perf_counter()
    if mode != "none":
        pipe.add_lora(lora, 0.8, merge=mode == "merge")
    applied = time.perf_counter() - started
    stamps: list[float] = []

    def generate(n: int) -> None:
        stamps.clear()
        stamps.append(time.perf_counter())
        pipe.generate("a lighthouse at dusk", sampler="dpmpp_2m", steps=n, guidance=7.5, seed=1,
                      width=512, height=512, output_type="latent",
                      callback=lambda step: stamps.append(time.perf_counter()))  # fmt: skip

    generate(1)
    generate(steps)
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "apply_s": applied, "steps": intervals, "peak_rss_mb": peak}


def main() -> None:
    from sd_speed import build_folder, cpu_has_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--folder", default="/work/runs/sd15-random")
    parser.add_argument("--mode", choices=("none", "hook", "merge"), default=None)
    args = parser.parse_args()
    precision = "bfloat16" if cpu_has_bf16() else "float32"
    folder = Path(args.folder) / precision
    lora = Path(args.folder) / "lora-rank16.safetensors"
    if args.mode:
        print(json.dumps(one_mode(folder, lora, args.mode, args.steps, precision)))
        return
    if not (folder / "model_index.json").exists():
        build_folder(folder, torch.bfloat16 if precision == "bfloat16" else torch.float32)
    if not lora.exists():
        import unnoise
        from tests.sd_fixtures import lora_layers, save_kohya_lora

        save_kohya_lora(lora, lora_layers(unnoise.load(folder, device="cpu", precision=precision), rank=16))
    runs = []
    for mode in ("none", "hook", "merge"):
        options = ["--mode", mode, "--steps", str(args.steps), "--folder", args.folder]
        command = [sys.executable, __file__, *options]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = statistics.median(runs[0]["steps"])
    lines = [
        f"# A rank-16 LoRA on an SD 1.5-shaped model, 512x512, guidance 7.5, DPM++ 2M, {precision}",
        "",
        "| LoRA | seconds per step (median) | steps | against none | apply s | peak memory MB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for run in runs:
        median = statistics.median(run["steps"])
        lines.append(
            f"| {run['mode']} | {median:.2f} | {', '.join(f'{s:.2f}' for s in run['steps'])} |"
            f" {median / base:.3f} | {run['apply_s']:.2f} | {run['peak_rss_mb']:.0f} |"
        )
    lines.append(f"\nLoRA file: {lora.stat().st_size:,} bytes.")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_apply.md").write_text(text)
    (RESULTS / "lora_apply.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
