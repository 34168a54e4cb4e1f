"""Live previews of a latent model: the full decoder against the cheapest decoder, a linear map.

While a latent model samples, the server and the page show each step's x0 estimate as a picture. Two ways
to turn a latent (c, h, w) into one:

- **full decoder**: the autoencoder's own decoder (what the finished image gets);
- **linear map**: each latent position's c values times a fitted (c, 3) matrix plus a bias gives the mean
  colour of its f x f pixels, enlarged to full size (nearest); the "latent RGB factors" approximation that
  AUTOMATIC1111 and ComfyUI use for Stable Diffusion's fast previews. Fitted here by least squares on half
  of the images, measured on the other half.

For each: milliseconds per preview (median of `--repeats`, one image), as a share of one sampler step of
the same model (a guided 20-step generation's time / 20), and PSNR against the full decoder's picture.

Run: .venv/bin/python benchmarks/latent_preview.py [--model emoji-64] [--images 32] [--repeats 50]
Writes benchmarks/results/latent_preview.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import unnoise
from unnoise.images import from_pil, psnr

RESULTS = Path(__file__).parent / "results"
PROMPTS = ("red apple", "dog face", "fire", "ghost", "strawberry", "green heart", "rocket", "japan flag")


def median_ms(work, repeats: int) -> float:
    work()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def fit_linear_preview(z: torch.Tensor, pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """Least squares (c + 1, 3): latents z (N, c, h, w) with a constant -> the mean colour of each
    position's f x f pixels (N, 3, H, W) in [-1, 1]."""
    colour = F.avg_pool2d(pixels, factor)  # (N, 3, h, w)
    a = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1)
    b = colour.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(a.double(), b.double()).solution.float()


def linear_preview(z: torch.Tensor, weights: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, c, h, w) -> (N, 3, H, W): per position colour, enlarged."""
    colour = torch.einsum("nchw,cd->ndhw", z, weights[:-1]) + weights[-1][None, :, None, None]
    return F.interpolate(colour, scale_factor=factor, mode="nearest").clamp(-1, 1)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emoji-64")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    pipe = unnoise.load(args.model)
    codec, f = pipe.codec, pipe.codec.factor
    if f == 1:
        raise SystemExit(f"{args.model} is a pixel model: its previews are the estimate itself")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    images = [pipe.generate(p, seed=i, steps=20)[0] for i, p in enumerate(prompts)]
    pixels = from_pil(images)  # (N, 3, R, R) in [-1, 1]
    z = codec.encode(pixels)  # (N, c, h, w): what the sampler's estimates look like
    half = len(z) // 2
    weights = fit_linear_preview(z[:half], pixels[:half], f)
    full = codec.preview(z[half:])
    linear = linear_preview(z[half:], weights, f)
    step_ms = median_ms(lambda: pipe.generate("red apple", seed=0, steps=20), max(3, args.repeats // 10)) / 20
    one = z[half : half + 1]
    rows = {
        "full decoder": {"ms": median_ms(lambda: codec.preview(one), args.repeats), "psnr": None},
        "linear map": {
            "ms": median_ms(lambda: linear_preview(one, weights, f), args.repeats),
            "psnr": round(float(psnr(linear, full).mean()), 2),
        },
    }
    lines = [
        f"# Live previews of `{args.model}` ({platform.processor() or platform.machine()},"
        f" {torch.get_num_threads()} threads)",
        "",
        f"One sampler step (a guided 20-step image / 20): {step_ms:.2f} ms.",
        "",
        "| preview | ms per preview | share of a step | PSNR against the full decoder (dB) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        said = "(itself)" if row["psnr"] is None else f"{row['psnr']:.2f}"
        lines.append(f"| {name} | {row['ms']:.2f} | {row['ms'] / step_ms:.0%} | {said} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latent_preview.md").write_text(text)
    (RESULTS / "latent_preview.json").write_text(json.dumps({"step_ms": step_ms, **rows}, indent=1))


if __name__ == "__main__":
    main()
