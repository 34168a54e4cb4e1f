"""`unnoise demo`: every sampler on a 2-D Gaussian mixture whose true distribution is known exactly."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .diffusion.samplers import SAMPLERS, sample
from .diffusion.schedules import karras
from .testing import example_mixture, sliced_wasserstein

PANEL = 220  # pixels per scatter plot
EXTENT = 3.0  # plotted square is [-EXTENT, EXTENT]^2


class CountingDenoiser:
    """Wraps a denoiser and counts its evaluations."""

    def __init__(self, denoiser):
        self.denoiser, self.evaluations = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.evaluations += 1
        return self.denoiser(x, sigma, cond)


def _scatter(points: torch.Tensor, title: str, colour=(30, 80, 200)):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (PANEL, PANEL + 16), "white")
    draw = ImageDraw.Draw(image)
    pixels = ((points.clamp(-EXTENT, EXTENT) + EXTENT) / (2 * EXTENT) * (PANEL - 1)).round().long()
    for px, py in pixels.tolist():
        draw.point((px, PANEL - 1 - py + 16), fill=colour)
    draw.text((4, 2), title, fill="black")
    return image


def run_demo(out: Path, steps: int = 20, samples: int = 2000, seed: int = 0) -> None:
    from PIL import Image

    mixture = example_mixture(2)
    exact = mixture.sample(samples, torch.Generator().manual_seed(seed + 1))
    noise = torch.randn(samples, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sigmas = karras(steps, 0.002, 80.0)
    panels = [_scatter(exact, "exact samples", (200, 60, 30))]
    print(f"{'sampler':<16} {'evaluations':>11} {'sliced W2':>10} {'seconds':>8}")
    floor = sliced_wasserstein(exact, mixture.sample(samples))
    print(f"{'(exact samples)':<16} {'-':>11} {floor:>10.4f} {'-':>8}")
    for name in sorted(SAMPLERS):
        counted = CountingDenoiser(mixture)
        start = time.perf_counter()
        x = sample(counted, noise, sigmas, sampler=name, generator=torch.Generator().manual_seed(seed + 2))
        seconds = time.perf_counter() - start
        distance = sliced_wasserstein(x, exact, generator=torch.Generator().manual_seed(0))
        print(f"{name:<16} {counted.evaluations:>11} {distance:>10.4f} {seconds:>8.3f}")
        panels.append(_scatter(x, f"{name} ({counted.evaluations} evals)"))
    columns = 4
    rows = (len(panels) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * PANEL, rows * (PANEL + 16)), "white")
    for k, panel in enumerate(panels):
        sheet.paste(panel, ((k % columns) * PANEL, (k // columns) * (PANEL + 16)))
    out.mkdir(parents=True, exist_ok=True)
    sheet.save(out / "demo.png")
    print(f"wrote {out / 'demo.png'}: {samples} points per sampler, {steps} steps, Karras schedule")
