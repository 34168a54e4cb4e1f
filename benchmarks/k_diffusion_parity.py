"""unnoise's samplers against k-diffusion's own code, under the labels AUTOMATIC1111 and ComfyUI share.

Both run on the exact denoiser of a 2-D Gaussian mixture (`unnoise.testing.example_mixture`, float64)
from the same starting points over the same Karras schedule, and the stochastic ones take the same
per-step noise (one seeded unit-normal tensor per step, handed to k-diffusion's `noise_sampler` and to
ours). The table is the largest absolute difference of the final samples, and of every step's x0
estimate, per sampler and eta.

k-diffusion is not a dependency of unnoise; this script reads its `sampling.py` from an installed copy
(`pip install --no-deps k-diffusion torchsde trampoline`; its package __init__ needs torchvision and more,
so only `sampling.py` is loaded, with k-diffusion's one helper it needs, `append_dims`).

Run: .venv/bin/python benchmarks/k_diffusion_parity.py [--steps 12] [--points 256]
Writes benchmarks/results/k_diffusion_parity.md and .json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

from unnoise.diffusion.samplers import SAMPLERS
from unnoise.diffusion.schedules import karras
from unnoise.settings import A1111_LABELS
from unnoise.testing import example_mixture

RESULTS = Path(__file__).parent / "results"
# (ours, k-diffusion's function, options for both)
CASES = [
    ("euler", "sample_euler", {}),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 1.0}),
    ("heun", "sample_heun", {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde", {"eta": 1.0}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 1.0}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}),
    ("dpmpp_3m", "sample_dpmpp_3m_sde", {"eta": 0.0}),  # ours by another name: not k-diffusion's 3M
]


def load_k_diffusion_sampling():
    """k_diffusion/sampling.py from the installed distribution, without the package's __init__."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs k-diffusion: .venv/bin/pip install --no-deps k-diffusion torchsde trampoline")
    folder = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.update({"k_diffusion": package, "k_diffusion.utils": utils})
    package.utils = utils
    module_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", folder / "sampling.py")
    sampling = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(sampling)
    return sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--points", type=int, default=256)
    args = parser.parse_args()
    kd = load_k_diffusion_sampling()
    mixture = example_mixture(2)
    sigmas = karras(args.steps, 0.02, 20.0)  # float64
    x0 = torch.randn(args.points, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = x0 * float(sigmas[0])
    noises = {
        float(s): torch.randn(
            args.points, 2, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64
        )
        for i, s in enumerate(sigmas[:-1].tolist())
    }  # one unit-normal draw per step, keyed by the step's sigma

    def noise_sampler(sigma, sigma_next):
        return noises[float(sigma)]

    def model(x, sigma, **_):  # k-diffusion's model(x, sigma (B,))
        return mixture(x, sigma, None)

    rows = []
    for ours, theirs, options in CASES:
        their_steps, our_steps = [], []
        kd_options = dict(options)
        if "eta" in options:  # the samplers that draw noise
            kd_options["noise_sampler"] = noise_sampler
        if ours == "dpmpp_2m_sde_heun":
            kd_options["solver_type"] = "heun"
        keep = their_steps.append
        their = getattr(kd, theirs)(
            model, x0.clone(), sigmas, disable=True, callback=lambda d, keep=keep: keep(d["denoised"]),
            **kd_options,
        )  # fmt: skip
        our_options = {} if ours == "dpmpp_3m" else dict(options)  # an ODE sampler: no eta, no noise
        if "eta" in our_options:
            our_options["noise_sampler"] = noise_sampler
        our = SAMPLERS[ours](
            mixture,
            x0.clone(),
            sigmas,
            callback=lambda s, kept=our_steps: kept.append(s.denoised),
            **our_options,
        )
        x0_difference = max(float((a - b).abs().max()) for a, b in zip(our_steps, their_steps, strict=True))
        rows.append({
            "ours": ours, "label": A1111_LABELS.get(ours, "(none: ours)"), "k_diffusion": theirs,
            "options": options, "final": float((our - their).abs().max()), "x0_estimates": x0_difference,
        })  # fmt: skip
    lines = [
        f"# unnoise against k-diffusion's code: {args.steps} Karras steps, {args.points} points of a 2-D"
        " Gaussian mixture, exact denoiser, float64, the same noise",
        "",
        "| ours | A1111 label | k-diffusion | options | final | x0 estimates |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        said = ", ".join(f"{k} {v:g}" for k, v in r["options"].items()) or "-"
        lines.append(
            f"| {r['ours']} | {r['label']} | {r['k_diffusion']} | {said} | {r['final']:.2e} |"
            f" {r['x0_estimates']:.2e} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "k_diffusion_parity.md").write_text(text)
    (RESULTS / "k_diffusion_parity.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
