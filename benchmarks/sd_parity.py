"""The parity table of issue 32: unnoise on a Stable-Diffusion-shaped model against the tools users come from.

A tiny SD 1.x-shaped pipeline (diffusers' classes, random weights, SD 1.5's scheduler config without a
`timestep_spacing`, as SD 1.5's own) is built for epsilon and for v prediction, then sampled with 6 steps,
guidance 5 and seed 3 by:

- **diffusers**: its Euler, EulerAncestral, DDIM (eta 0 and 1) and DPMSolverMultistep schedulers, each
  built from the model's scheduler config (Karras: `use_karras_sigmas`), in StableDiffusionPipeline's loop
  (latents drawn from the seed's generator, which then gives every step's noise); against unnoise loaded
  with `convention="diffusers"`. A second column runs unnoise with the AUTOMATIC1111 convention on the
  same row, to show what the conventions decide.
- **AUTOMATIC1111**, when k-diffusion is installed: k-diffusion's `CompVisDenoiser` / `CompVisVDenoiser`
  (fractional timesteps; the model's schedule computed in float64 and kept in float32, as CompVis' code
  does) and its samplers, on the schedule A1111's "Automatic" picks for each, noise * sigma_max; against
  unnoise with `convention="a1111"`. The same parts with `quantize=True` (the nearest timestep) and noise *
  sqrt(1 + sigma_max^2) are ComfyUI's choices (read from its source, not its code run here), against
  `convention="comfyui"`.

Each cell is max |ours - theirs| / max |theirs|: of the final latents, and of every step's x0 estimate.
float32 round-off is about 1e-6 here.

Run: .venv/bin/python benchmarks/sd_parity.py     (k-diffusion rows: pip install --no-deps k-diffusion)
Writes benchmarks/results/sd_parity.md and .json.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import unnoise
from tests.sd_fixtures import ROWS, Row, parity, relative_difference, save_tiny_sd

RESULTS = Path(__file__).parent / "results"
PROMPT, STEPS, GUIDANCE, SEED = "a red cat", 6, 5.0, 3
# (ours, k-diffusion's function, its options)
K_ROWS = [
    ("euler", "sample_euler", {}),
    ("euler_ancestral", "sample_euler_ancestral", {}),
    ("heun", "sample_heun", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}),
]


def load_k_diffusion():
    """k-diffusion's sampling.py and external.py, without its package __init__ (which needs torchvision)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    sys.path.insert(0, str(Path(__file__).parent))
    from k_diffusion_parity import load_k_diffusion_sampling

    sampling = load_k_diffusion_sampling()
    folder = Path(next(iter(spec.submodule_search_locations)))
    module_spec = importlib.util.spec_from_file_location("k_diffusion.external", folder / "external.py")
    external = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(external)
    return sampling, external


class CompVisModel(torch.nn.Module):
    """The diffusers UNet as CompVis' LatentDiffusion looks to k-diffusion: alphas_cumprod and apply_model."""

    def __init__(self, unet, formulation):
        super().__init__()
        self.unet = unet
        betas = torch.linspace(
            formulation.beta_start**0.5, formulation.beta_end**0.5, 1000, dtype=torch.float64
        )
        self.alphas_cumprod = torch.cumprod(1 - betas**2, 0).float()  # computed in float64, kept in float32

    def apply_model(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond).sample


def k_diffusion_sample(kd, pipe, ours: str, function: str, *, comfyui: bool):
    """k-diffusion's sampler on CompVis' wrapper, with classifier-free guidance as A1111's CFGDenoiser."""
    sampling, external = kd
    v = pipe.denoiser.formulation.parametrization == "v"
    wrapper = (external.CompVisVDenoiser if v else external.CompVisDenoiser)(
        CompVisModel(pipe.denoiser.network.unet, pipe.denoiser.formulation), quantize=comfyui
    )
    if comfyui:  # ComfyUI computes the sigmas in float64 and keeps them in float32
        model = wrapper.inner_model
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alpha_bar = torch.cumprod(1 - betas, 0)
        wrapper.sigmas = ((1 - alpha_bar) / alpha_bar).sqrt().float()
        wrapper.log_sigmas = wrapper.sigmas.log()
        del model
    cond = torch.cat([pipe.encode([""]).tokens, pipe.encode([PROMPT]).tokens])  # (2, 77, D)

    def guided(x, sigma, **_):
        unconditional, conditional = wrapper(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=cond).chunk(2)
        return unconditional + GUIDANCE * (conditional - unconditional)

    plan = pipe.convention.plan(ours)
    sigma_min, sigma_max = float(wrapper.sigmas[0]), float(wrapper.sigmas[-1])
    if plan.spacing == "karras":
        sigmas = sampling.get_sigmas_karras(STEPS, sigma_min, sigma_max)
    elif plan.spacing == "exponential":
        sigmas = sampling.get_sigmas_exponential(STEPS + plan.drop_penultimate, sigma_min, sigma_max)
    else:
        sigmas = wrapper.get_sigmas(STEPS)
    if plan.drop_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    generator = torch.Generator().manual_seed(SEED)
    size = pipe.denoiser.network.unet.config.sample_size
    x = torch.randn((1, 4, size, size), generator=generator)
    x = x * ((1 + sigmas[0] ** 2) ** 0.5 if comfyui else sigmas[0])

    def noise_sampler(sigma, sigma_next):  # the seed's generator, after the starting noise, as unnoise's
        return torch.randn((1, 4, size, size), generator=generator)

    estimates = []
    options = (
        {"noise_sampler": noise_sampler}
        if function not in ("sample_euler", "sample_heun", "sample_dpmpp_2m")
        else {}
    )
    with torch.no_grad():
        final = getattr(sampling, function)(
            guided, x, sigmas, disable=True, callback=lambda d: estimates.append(d["denoised"]), **options
        )
    return final, estimates


def unnoise_sample(pipe, ours: str):
    estimates = []
    final = pipe.generate(
        PROMPT, sampler=ours, steps=STEPS, guidance=GUIDANCE, seed=SEED, output_type="latent",
        callback=lambda step: estimates.append(step.denoised),
    )  # fmt: skip
    return final, estimates


def main() -> None:
    warnings.filterwarnings("ignore")
    kd = load_k_diffusion()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prediction in ("epsilon", "v_prediction"):
            folder = save_tiny_sd(Path(tmp) / prediction, prediction)
            diffusers_way = unnoise.load(folder, device="cpu", convention="diffusers")
            a1111_way = unnoise.load(folder, device="cpu", convention="a1111")
            for row in ROWS:
                final, x0 = parity(diffusers_way, folder, row, prompt=PROMPT, steps=STEPS, guidance=GUIDANCE,
                                   seed=SEED)  # fmt: skip
                try:
                    other = parity(a1111_way, folder, row, prompt=PROMPT, steps=STEPS, guidance=GUIDANCE,
                                   seed=SEED)[0]  # fmt: skip
                except Exception as error:
                    other = str(error)
                rows.append(table_row("diffusers", prediction, row, final, x0, other))
            if kd is None:
                continue
            for name in ("a1111", "comfyui"):
                pipe = unnoise.load(folder, device="cpu", convention=name)
                for ours, function, _ in K_ROWS:
                    theirs, their_estimates = k_diffusion_sample(
                        kd, pipe, ours, function, comfyui=name == "comfyui"
                    )
                    mine, my_estimates = unnoise_sample(pipe, ours)
                    x0 = max(
                        relative_difference(a, b) for a, b in zip(my_estimates, their_estimates, strict=True)
                    )
                    plan = pipe.convention.plan(ours)
                    rows.append(
                        table_row(
                            name,
                            prediction,
                            Row(ours, plan.spacing),
                            relative_difference(mine, theirs),
                            x0,
                            None,
                        )
                    )
    lines = [
        f"# unnoise against diffusers and k-diffusion on an SD-shaped model: {STEPS} steps,"
        f" guidance {GUIDANCE:g},"
        f" seed {SEED}; max |ours - theirs| / max |theirs|",
        "",
        "| convention | prediction | sampler | schedule | eta | final latents | x0 estimates |"
        " same row, a1111 convention |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        other = (
            "-"
            if r["other"] is None
            else (f"{r['other']:.1e}" if isinstance(r["other"], float) else "no such schedule")
        )
        lines.append(
            f"| {r['convention']} | {r['prediction']} | {r['sampler']} | {r['schedule']} | {r['eta']:g} |"
            f" {r['final']:.1e} | {r['x0']:.1e} | {other} |"
        )
    if kd is None:
        lines.append("\n(k-diffusion is not installed: no AUTOMATIC1111 / ComfyUI rows)")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sd_parity.md").write_text(text)
    (RESULTS / "sd_parity.json").write_text(json.dumps(rows, indent=1))


def table_row(convention, prediction, row, final, x0, other):
    return {
        "convention": convention, "prediction": prediction, "sampler": row.sampler, "schedule": row.schedule,
        "eta": row.eta, "final": final, "x0": x0, "other": other,
    }  # fmt: skip


if __name__ == "__main__":
    main()
