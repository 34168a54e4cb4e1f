"""Editing with the same samplers: img2img (SDEdit), inpainting (RePaint), variations and interpolation.

All of it is a start point, a slice of the schedule or a denoiser wrapper, never a separate pipeline:

- img2img (Meng et al. 2022, SDEdit): noise the input to sigmas[k] and run the sampler on sigmas[k:],
  with k = n - round(strength * n); strength 0 runs no step and returns the input.
- inpainting: the wrapped denoiser answers the known input y wherever the mask is 0, so every sampler keeps
  the known region on its noisy path (x = y + sigma n there) and regenerates the rest in agreement with it;
  the final image takes y outside the mask exactly. RePaint (Lugmayr et al. 2022, Alg. 1) resampling
  runs each block of `jump` steps `resample` times, re-noising between runs, so the regenerated region
  can adapt to the known one.
- variations and interpolation: spherical interpolation of unit noises (which keeps their norm, so the
  mix is still a plausible starting noise), and linear interpolation of text conditions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnnoiseError
from .samplers import DEFAULT_SAMPLER, check_sigmas, get_sampler
from .tensors import Generators, append_dims, randn_like


def check_strength(strength: float, *, name: str = "strength") -> float:
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 <= strength <= 1.0:
        raise UnnoiseError(f"{name} must be a number in [0, 1], got {strength!r}")
    return float(strength)


def img2img_start(n: int, strength: float) -> int:
    """Index k of the step where SDEdit starts, out of n steps: the last round(strength * n) steps run."""
    return n - round(check_strength(strength) * n)


def img2img(
    denoiser,
    init: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    strength: float,
    sampler: str = DEFAULT_SAMPLER,
    cond: Any = None,
    generator: Generators = None,
    callback=None,
    **options,
) -> torch.Tensor:
    """SDEdit: x = init + sigmas[k] noise, then `sampler` on sigmas[k:]. init, noise: (B, ...).

    strength 0 returns `init` itself; strength 1 starts from noise alone, exactly as generation does.
    """
    sigmas = check_sigmas(sigmas)
    k = img2img_start(len(sigmas) - 1, strength)
    if k == len(sigmas) - 1:
        return init
    x = noise * float(sigmas[0]) if k == 0 else init + noise * float(sigmas[k])
    fn = get_sampler(sampler)
    return fn(denoiser, x, sigmas[k:], cond=cond, generator=generator, callback=callback, **options)


def known_region(denoiser, known: torch.Tensor, mask: torch.Tensor):
    """A denoiser whose answer is `known` where mask is 0 and D's answer where mask is 1.

    known (B, ...) is the clean input; mask broadcasts against it, 1 = regenerate, 0 = keep.
    """

    def inpainting(x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return torch.where(mask.bool(), denoiser(x, sigma, cond), known)

    return inpainting


def repaint_plan(n: int, *, jump: int = 1, resample: int = 1) -> list[tuple[int, int]]:
    """(a, b) index pairs: run the sampler from sigmas[a] down to sigmas[b]. Each block of `jump` steps is
    run `resample` times; before a repeat, the sample is re-noised from sigmas[b] back up to sigmas[a]."""
    if jump < 1 or resample < 1:
        raise UnnoiseError(f"jump and resample must be at least 1, got {jump} and {resample}")
    if resample == 1:  # no repeats: one run, so multistep samplers keep their history throughout
        return [(0, n)]
    blocks = [(a, min(a + jump, n)) for a in range(0, n, jump)]
    return [block for block in blocks for _ in range(resample)]


def renoise(x: torch.Tensor, sigma_from: float, sigma_to: float, generator: Generators) -> torch.Tensor:
    """Forward process from sigma_from up to sigma_to: add independent noise of variance to^2 - from^2."""
    return x + math.sqrt(sigma_to**2 - sigma_from**2) * randn_like(x, generator)


def inpaint(
    denoiser,
    known: torch.Tensor,
    mask: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    strength: float = 1.0,
    sampler: str = DEFAULT_SAMPLER,
    cond: Any = None,
    generator: Generators = None,
    callback=None,
    jump: int = 1,
    resample: int = 1,
    **options,
) -> torch.Tensor:
    """Regenerate `known` (B, C, H, W) where `mask` (B or 1, 1, H, W) is 1; elsewhere return it exactly.

    The regenerated region starts from `known` noised to the img2img level for `strength` (1: from noise).
    """
    sigmas = check_sigmas(sigmas)
    mask = (mask > 0).to(known.dtype)
    keep = known_region(denoiser, known, mask)
    n = len(sigmas) - 1
    start = img2img_start(n, strength)
    x = known + noise * float(sigmas[start])  # the known part's noisy path (and img2img's start)
    if start == 0:  # strength 1: the regenerated part starts from noise alone
        x = torch.where(mask.bool(), noise * float(sigmas[0]), x)
    fn = get_sampler(sampler)
    plan = [(a + start, b + start) for a, b in repaint_plan(n - start, jump=jump, resample=resample)]
    previous_end = None
    for a, b in plan:
        if previous_end is not None and previous_end > a:  # a repeat of the block: back up to sigmas[a]
            x = renoise(x, float(sigmas[previous_end]), float(sigmas[a]), generator)
        report = _shifted(callback, a)
        segment = sigmas[a : b + 1]
        x = fn(keep, x, segment, to_zero=False, cond=cond, generator=generator, callback=report, **options)
        previous_end = b
    return torch.where(mask.bool(), x, known)  # (B, C, H, W): outside the mask, `known` bit for bit


def masked_start(known: torch.Tensor, mask: torch.Tensor, content: str, generator: Generators = None):
    """What the part of `known` (B, C, H, W) under `mask` (B or 1, 1, H, W; 1 = regenerate) starts from
    before it is noised to the strength: itself ("original"), the colours around it spread in ("fill"),
    unit Gaussian noise ("noise") or 0, flat mid grey ("nothing"). Outside the mask, `known` as it is."""
    hole = (mask > 0).expand_as(known)
    if content == "original":
        return known
    if content == "nothing":
        return known.masked_fill(hole, 0.0)
    if content == "noise":
        return torch.where(hole, randn_like(known, generator), known)
    if content == "fill":
        return torch.where(hole, spread_inwards(known, ~(mask > 0)), known)
    raise UnnoiseError(f"unknown masked content {content!r}; choose original, fill, noise or nothing")


def spread_inwards(image: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Each unknown pixel of `image` (B, C, H, W) as the mean of the known pixels (`known`, B or 1, 1, H, W)
    in the smallest square around it, of side 3, 5, 9, 17, ..., that holds any: the colours flow into a hole
    from its edges. Pixels with no known pixel anywhere become 0."""
    weight = known.to(image.dtype).expand(image.shape[0], 1, *image.shape[2:])  # (B, 1, H, W)
    out, done = torch.zeros_like(image), weight > 0
    radius = 1
    while not bool(done.all()) and radius < 2 * max(image.shape[-2:]):
        total = F.avg_pool2d(image * weight, 2 * radius + 1, stride=1, padding=radius)  # (B, C, H, W)
        count = F.avg_pool2d(weight, 2 * radius + 1, stride=1, padding=radius)  # (B, 1, H, W)
        fresh = (count > 0) & ~done
        out = torch.where(fresh, total / count.clamp_min(1e-12), out)
        done, radius = done | fresh, 2 * radius
    return out


def _shifted(callback, offset: int) -> Callable | None:
    """The callback with step indices counted from the start of the whole schedule."""
    if callback is None or offset == 0:
        return callback
    return lambda step: callback(step._replace(index=step.index + offset))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per sample between noises a and b (B, ...): t = 0 gives a, t = 1 gives b.

    Falls back to linear interpolation where a and b are (nearly) parallel.
    """
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    a_flat, b_flat = a.flatten(1), b.flatten(1)  # (B, D)
    cos = (a_flat * b_flat).sum(1) / (a_flat.norm(dim=1) * b_flat.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))  # (B,)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(parallel, t * torch.ones_like(sin), torch.sin(t * omega) / safe)
    return append_dims(wa, a.ndim) * a + append_dims(wb, a.ndim) * b


def variation_noise(noise: torch.Tensor, variation: torch.Tensor, strength: float) -> torch.Tensor:
    """AUTOMATIC1111's variation seed: the image's noise moved `strength` of the way towards another's."""
    return noise if check_strength(strength) == 0 else slerp(noise, variation, strength)
