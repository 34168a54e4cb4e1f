"""What the seed promise costs: generation with batch-invariant arithmetic against the batched arithmetic it
replaced, on the shipped `shapes-32`, in one process, interleaved rounds.

Invariant (today's code): each prompt encoded alone and padded to the encoder's 32 tokens, per-image
vectors through `PerImageLinear` row by row, a lone image denoised as a batch of two. Baseline (before):
the same code with those three undone by patching, i.e. one batched product for the per-image vectors,
prompts padded to the longest in the batch, a lone image as a batch of one. Each row also says whether
image 1 of the batch equals seed + 1 drawn alone (the promise).

Run: .venv/bin/python benchmarks/batch_invariance.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch
from torch import nn

import unnoise
from unnoise.diffusion.denoiser import Denoiser
from unnoise.diffusion.tensors import append_dims
from unnoise.nn.layers import PerImageLinear
from unnoise.pipeline import Pipeline

PROMPT = "a red circle above a blue square"


@contextlib.contextmanager
def batched_arithmetic():
    """The code as it was before the promise was made exact on every CPU."""
    saved = PerImageLinear.forward, Pipeline.encode, Denoiser.forward

    def unpaired(self, x, sigma, cond=None):  # Denoiser.forward without the batch of two for a lone image
        c_skip, c_out, c_in, c_noise = self.formulation.scalings(sigma)
        output = self.network(append_dims(c_in, x.ndim) * x, c_noise, cond)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * output.to(x.dtype)

    PerImageLinear.forward = nn.Linear.forward
    Pipeline.encode = lambda self, prompts: self.text.encode(prompts)
    Denoiser.forward = unpaired
    try:
        yield
    finally:
        PerImageLinear.forward, Pipeline.encode, Denoiser.forward = saved


def seconds(pipe, n: int, guidance: float) -> float:
    start = time.perf_counter()
    pipe.generate(PROMPT, seed=0, num_images=n, steps=20, guidance=guidance)
    return time.perf_counter() - start


def promise_holds(pipe, n: int, guidance: float) -> bool:
    if n == 1:
        return True
    batch = pipe.generate(PROMPT, seed=0, num_images=n, steps=6, guidance=guidance)
    alone = pipe.generate(PROMPT, seed=1, steps=6, guidance=guidance)
    return bool(np.array_equal(np.asarray(batch[1]), np.asarray(alone[0])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pipe = unnoise.load("shapes-32", device="cpu")
    pipe.generate(PROMPT, steps=2)  # warm
    threads = torch.get_num_threads()
    print(f"threads {threads}; 20 steps of {pipe.name}, seconds per request (median of rounds)")
    print("| images | guidance | invariant s | batched s | ratio | promise (invariant / batched) |")
    print("|---:|---:|---:|---:|---:|---|")
    for guidance in (1.5, 1.0):
        for n in (1, 2, 8):
            ours, base = [], []
            for _ in range(args.rounds):
                ours.append(seconds(pipe, n, guidance))
                with batched_arithmetic():
                    base.append(seconds(pipe, n, guidance))
            held = promise_holds(pipe, n, guidance)
            with batched_arithmetic():
                held_before = promise_holds(pipe, n, guidance)
            a, b = statistics.median(ours), statistics.median(base)
            print(f"| {n} | {guidance} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {held} / {held_before} |")


if __name__ == "__main__":
    main()
