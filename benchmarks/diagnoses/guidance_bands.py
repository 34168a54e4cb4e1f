"""Guidance by noise level: does a guidance scale that changes with sigma escape the trade-off the shipped
model shows at one scale (relations gain with guidance, counts lose)?

Each row guides with its own scale in bands of sigma (guidance limited to an interval, Kynkaanniemi et al.
2024, is the best-known case) and is judged on `make demo`'s prompt (seeds 0 to 7, binding on) and on
ShapesEval's two-object and counting prompts (24 each x SAMPLES images). The first row, one scale at
every sigma, is the model's plain sampling; the script checks that it draws exactly what
`Pipeline.generate` draws, so every row differs from it only in the scale.

Run: .venv/bin/python benchmarks/diagnoses/guidance_bands.py [MODEL] [--samples 4]
(prints one table; about 70 s a row on a 2-core Xeon at 4 samples; writes nothing)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for demo_check
from demo_check import DEMO

from unnoise.diffusion.guidance import stack_conditions
from unnoise.eval.shapes_eval import check, evaluate, first_prompts
from unnoise.images import to_pil
from unnoise.pipeline import Pipeline, load
from unnoise.settings import DEFAULT_SAMPLER, DEFAULT_STEPS

Bands = Sequence[tuple[float, float]]  # (lowest sigma, scale), highest band first; the last starts at 0

ROWS: dict[str, Bands] = {
    "1.5 at every sigma": [(0.0, 1.5)],
    "2 at every sigma": [(0.0, 2.0)],
    "3 at every sigma": [(0.0, 3.0)],
    "3 above sigma 20, 1.5 below": [(20.0, 3.0), (0.0, 1.5)],
    "3 above sigma 5, 1.5 below": [(5.0, 3.0), (0.0, 1.5)],
    "3 for sigma 11 to 20, 1.5 elsewhere": [(20.0, 1.5), (11.0, 3.0), (0.0, 1.5)],
    "3 for sigma 1 to 20, 1.5 elsewhere": [(20.0, 1.5), (1.0, 3.0), (0.0, 1.5)],
    "1.5 above sigma 5, 3 below": [(5.0, 1.5), (0.0, 3.0)],
}
CATEGORIES = ("two_objects", "counting")


def scale_at(bands: Bands, sigma: float) -> float:
    return next(scale for lowest, scale in bands if sigma >= lowest)


def banded_cfg(denoiser, bands: Bands, uncond):
    """Classifier-free guidance whose scale is the band's at the step's sigma (one sigma per batch)."""

    def guided(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        scale = scale_at(bands, float(sigma.reshape(-1)[0]))
        both = stack_conditions(uncond, cond)  # x (B, ...) -> one call on (2B, ...)
        unconditional, conditional = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided


def generate(pipe: Pipeline, bands: Bands, prompt: str, seed: int, n: int):
    """n images of `prompt` from seeds seed.., binding on, the default sampler and steps, guided by bands."""
    first = pipe.settings(prompt, "", DEFAULT_SAMPLER, None, DEFAULT_STEPS, 1.0, seed)
    each = [first.replace(seed=seed + i, bind_attributes=True) for i in range(n)]
    generators = [torch.Generator().manual_seed(s.seed) for s in each]
    noise = torch.stack([pipe.noise(s, g) for s, g in zip(each, generators, strict=True)]).to(pipe.device)
    uncond = pipe.text.encode([""] * n).to(pipe.device)
    denoiser = banded_cfg(pipe.denoiser, bands, uncond)
    with torch.no_grad():
        x = pipe.draw(denoiser, noise, each[0], pipe.condition(each), generators, None, None, None)
    return to_pil(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="shapes-32")
    parser.add_argument("--samples", type=int, default=4, help="images per ShapesEval prompt")
    args = parser.parse_args()
    pipe = load(args.model)
    plain = pipe.generate(DEMO.prompt, seed=0, num_images=8, guidance=1.5, bind_attributes=True)
    banded = generate(pipe, ROWS["1.5 at every sigma"], DEMO.prompt, 0, 8)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(plain, banded, strict=True)), "not the plain path"
    specs = [s for s in first_prompts(24) if s.category in CATEGORIES]
    print(f"{args.model}, {len(specs) // 2} prompts x {args.samples} images a category, binding on\n")
    print(
        "| guidance | make demo (of 8) | two objects | counting | two, counting: points against the first row"
        " | seconds |\n|---|---:|---:|---:|---:|---:|"
    )
    baseline = None
    for name, bands in ROWS.items():
        start = time.perf_counter()
        demo = sum(check(image, DEMO)[0] for image in generate(pipe, bands, DEMO.prompt, 0, 8))
        report = evaluate(lambda p, seed, n, b=bands: generate(pipe, b, p, seed, n), specs, args.samples)
        got = report.categories()
        accuracy = [got[c]["accuracy"] for c in CATEGORIES]
        baseline = baseline or accuracy
        cells = " | ".join(f"{got[c]['accuracy']:.1%} ({got[c]['correct']})" for c in CATEGORIES)
        change = ", ".join(f"{100 * (a - b):+.1f}" for a, b in zip(accuracy, baseline, strict=True))
        print(f"| {name} | {demo} | {cells} | {change} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
