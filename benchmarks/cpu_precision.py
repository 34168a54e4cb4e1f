"""What this CPU does with bf16, and what each network preset trains at: the numbers behind
`--precision auto` and issue 11's throughput table.

1. A 2048 x 2048 matrix multiply in fp32 and in bf16 (GFLOP/s), and whether oneDNN reports native bf16.
2. One training step (forward, EDM loss, backward, fused AdamW) at batch 64 and 32x32 with a random
   14-token text condition, for the `small`, `small-pos` and `dit-small` presets in fp32, and `small` under
   bf16 autocast: images/s (median of the timed steps after warm-up), and each one's ratio to `small` in
   fp32, measured in the same run. Data loading is not included.

Run: .venv/bin/python benchmarks/cpu_precision.py [--steps 3]   (writes benchmarks/results/cpu_precision.md)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from unnoise.diffusion.denoiser import Denoiser
from unnoise.diffusion.formulations import FORMULATIONS
from unnoise.nn.presets import PRESETS
from unnoise.text.encoders import TextEmbedding

RESULTS = Path(__file__).parent / "results"
BATCH = 64


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def images_per_second(preset: str, bf16: bool, steps: int) -> float:
    torch.manual_seed(0)
    config = PRESETS[preset]
    network = config.build()
    layout = torch.channels_last if config.kind == "unet" else torch.contiguous_format
    network = network.to(memory_format=layout)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, fused=True)
    denoiser = Denoiser(network, FORMULATIONS["edm"])
    r = config.resolution
    x0 = torch.randn(BATCH, 3, r, r).to(memory_format=layout)
    noise, sigma = torch.randn_like(x0), torch.rand(BATCH) * 2 + 0.05
    text = TextEmbedding(
        torch.randn(BATCH, 14, 384), torch.ones(BATCH, 14, dtype=torch.bool), torch.randn(BATCH, 384)
    )

    def step() -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = denoiser.loss(x0, sigma, noise, text).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step()  # warm-up
    return BATCH / statistics.median(step() for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    args = parser.parse_args()
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    lines = [
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}; oneDNN native bf16: {native}; "
        f"threads: {torch.get_num_threads()}",
        "",
        "| matrix multiply 2048 x 2048 | GFLOP/s |",
        "|---|---:|",
        f"| fp32 | {matmul_gflops(torch.float32):.1f} |",
        f"| bf16 | {matmul_gflops(torch.bfloat16):.2f} |",
        "",
        f"| training step, batch {BATCH}, 32x32 | images/s | vs small fp32 |",
        "|---|---:|---:|",
    ]
    base = None
    for preset, bf16 in (("small", False), ("small-pos", False), ("dit-small", False), ("small", True)):
        rate = images_per_second(preset, bf16, args.steps)
        base = base or rate
        lines.append(f"| {preset}, {'bf16 autocast' if bf16 else 'fp32'} | {rate:.1f} | {rate / base:.2f} |")
        print(lines[-1], flush=True)
    text = "# CPU precision and network throughput\n\n`.venv/bin/python benchmarks/cpu_precision.py`\n\n"
    (RESULTS / "cpu_precision.md").write_text(text + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
