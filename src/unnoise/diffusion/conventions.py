"""How a tool turns "n steps" of a discrete-time model into a schedule: the choices that decide parity.

A discrete VP model (Stable Diffusion, DDPM) was trained on N timesteps. To sample it in n steps a tool
chooses, often without saying so:

- the **spacing**: which n noise levels (Karras', uniform in t, or a subsequence of the N timesteps:
  "leading" with an offset, "trailing", or diffusers' rounded linspace);
- the **timestep input**: what the network is fed for a sigma between two timesteps (`VPDiscrete`);
- the **schedule precision**: the float precision of the sigma table (`VPDiscrete`);
- the **start noise**: sigma_max * n, or sqrt(1 + sigma_max^2) * n (unit variance in the VP coordinate
  x_vp = x / sqrt(1 + sigma^2), where DDIM and DPM-Solver in diffusers, and ComfyUI, start);
- the **final sigma**: 0, or the first timestep's sigma (DDIM's `set_alpha_to_one = False`), where the
  result is the VP latent x_vp at that level, not a denoised estimate.

Two tools give the same image from the same noise only when all five agree. A `Convention` names one
tool's choices; `plan(sampler, schedule)` resolves them for one sampler and schedule type, as that tool
does. Presets: AUTOMATIC1111 (k-diffusion's samplers over CompVis' schedule), ComfyUI and diffusers (each
scheduler class built `from_config` of an SD 1.x/2.x scheduler config).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ..errors import UnnoiseError
from .formulations import K_DIFFUSION_PRECISIONS, SchedulePrecision, TimestepInput, VPDiscrete
from .schedules import exponential, karras, uniform_t

Spacing = Literal[
    "karras", "exponential", "uniform", "leading", "leading_dpm", "trailing", "linspace_rounded"
]
StartNoise = Literal["sigma", "vp"]
FinalSigma = Literal["zero", "sigma_min"]
# AUTOMATIC1111's "Schedule type" labels for the spacings it has (diffusers' subsequences have none)
SCHEDULE_LABELS: dict[Spacing, str] = {
    "karras": "Karras",
    "exponential": "Exponential",
    "uniform": "Uniform",
    "leading": "Leading",
    "leading_dpm": "Leading",
    "trailing": "Trailing",
    "linspace_rounded": "Linspace",
}


@dataclass(frozen=True)
class Plan:
    """The schedule one sampler runs on, as one tool makes it."""

    spacing: Spacing
    timestep_input: TimestepInput
    schedule_precision: SchedulePrecision
    start_noise: StartNoise = "sigma"
    final_sigma: FinalSigma = "zero"
    steps_offset: int = 0  # added to "leading" timesteps (SD's scheduler configs say 1)
    drop_penultimate: bool = False  # AUTOMATIC1111's discard_next_to_last_sigma (its 3M SDE)

    def formulation(self, base: VPDiscrete) -> VPDiscrete:
        return replace(base, timestep_input=self.timestep_input, schedule_precision=self.schedule_precision)

    def sigmas(self, base: VPDiscrete, n: int) -> torch.Tensor:
        """The n + 1 noise levels (float64, decreasing, ending in 0 or the table's first sigma)."""
        f = self.formulation(base)
        if self.drop_penultimate:
            sigmas = replace(self, drop_penultimate=False).sigmas(base, n + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        levels = spaced_levels(f, n, self.spacing, self.steps_offset)  # (n,)
        if self.schedule_precision != "float64":
            levels = levels.float().double()  # the tools keep their schedules in float32
        last = f.sigma_min if self.final_sigma == "sigma_min" else 0.0
        return torch.cat([levels, torch.tensor([last], dtype=torch.float64)])

    def start_scale(self, sigma_max: float) -> float:
        """What unit noise is multiplied by to start at sigma_max."""
        return math.sqrt(1 + sigma_max**2) if self.start_noise == "vp" else sigma_max


def spaced_levels(f: VPDiscrete, n: int, spacing: Spacing, offset: int = 0) -> torch.Tensor:
    """n decreasing noise levels of the model `f` (float64; Karras' and the exponential one computed in
    float32 where the tool computes them so)."""
    dtype = torch.float32 if f.schedule_precision in K_DIFFUSION_PRECISIONS else torch.float64
    big_n = f.num_timesteps
    if not isinstance(n, int) or not 1 <= n <= big_n:
        raise UnnoiseError(f"the number of steps must be in 1..{big_n} for this model, got {n!r}")
    if spacing == "karras":
        return karras(n, f.sigma_min, f.sigma_max, dtype=dtype)[:-1]
    if spacing == "exponential":
        return exponential(n, f.sigma_min, f.sigma_max, dtype=dtype)[:-1]
    if (
        spacing == "uniform"
    ):  # t = N-1 .. 0 evenly, fractional (k-diffusion's get_sigmas, diffusers' linspace)
        return uniform_t(f, n, 0.0, float(big_n - 1))[:-1]
    if spacing == "leading":  # 0, N/n, 2N/n, ... + offset (DDIM's paper; diffusers' "leading")
        t = torch.arange(n) * (big_n // n) + offset
    elif spacing == "leading_dpm":  # diffusers' DPM-Solver "leading": n + 1 points of N // (n + 1), 0 dropped
        t = torch.arange(1, n + 1) * (big_n // (n + 1)) + offset
    elif spacing == "trailing":  # N-1, N-1-N/n, ... (Lin et al. 2024, Table 2)
        t = torch.arange(big_n, 0, -big_n / n).round() - 1
    elif spacing == "linspace_rounded":  # diffusers' DPM-Solver "linspace": n+1 points, rounded, last dropped
        t = torch.linspace(0, big_n - 1, n + 1, dtype=torch.float64).round()[1:]
    else:
        raise UnnoiseError(f"unknown spacing {spacing!r}")
    t = t.long().clamp(0, big_n - 1).sort(descending=True).values
    return f.table[t]


@dataclass(frozen=True)
class Convention:
    """One tool's way of sampling a discrete VP model: `plan(sampler, schedule)` for each sampler."""

    name: str
    timestep_input: TimestepInput
    schedule_precision: SchedulePrecision
    start_noise: StartNoise
    automatic: dict[str, Spacing] = field(default_factory=dict)  # sampler -> its "Automatic" spacing
    automatic_default: Spacing = "karras"
    drop_penultimate: frozenset[str] = frozenset()

    def plan(self, sampler: str, schedule: str = "automatic") -> Plan:
        spacing = self.spacing(sampler, schedule)
        return Plan(
            spacing, self.timestep_input, self.schedule_precision, self.start_noise,
            drop_penultimate=sampler in self.drop_penultimate,
        )  # fmt: skip

    def spacing(self, sampler: str, schedule: str) -> Spacing:
        schedule = schedule.lower()
        if schedule == "automatic":
            return self.automatic.get(sampler, self.automatic_default)
        by_label = {label.lower(): spacing for spacing, label in SCHEDULE_LABELS.items()}
        if schedule in by_label:
            return by_label[schedule]
        raise UnnoiseError(
            f"unknown schedule type {schedule!r}; choose Automatic, {', '.join(SCHEDULE_LABELS.values())}"
        )


@dataclass(frozen=True)
class DiffusersConvention(Convention):
    """diffusers: each sampler is a scheduler class built `from_config` of the model's scheduler config, whose
    `timestep_spacing` (absent in SD 1.5's) falls back to the class's own default."""

    config_spacing: str | None = None  # the scheduler config's timestep_spacing, if it has one
    steps_offset: int = 0  # the scheduler config's
    set_alpha_to_one: bool = False  # the scheduler config's (DDIM's final alpha)

    def plan(self, sampler: str, schedule: str = "automatic") -> Plan:
        karras_asked = schedule.lower() == "karras"
        if schedule.lower() not in ("automatic", "karras"):  # the label Automatic resolved to, or a mistake
            automatic = self.plan(sampler)
            if SCHEDULE_LABELS[automatic.spacing].lower() != schedule.lower():
                raise UnnoiseError(
                    f"with the diffusers convention {sampler}'s schedule type is Automatic"
                    f" ({SCHEDULE_LABELS[automatic.spacing]}) or Karras, not {schedule!r}"
                )
            return automatic
        base = Plan("uniform", "fractional", "float32", steps_offset=self.steps_offset)
        if sampler in ("euler", "euler_ancestral"):  # Euler(Ancestral)DiscreteScheduler, default "linspace"
            spacing = self.config_spacing or "linspace"
            if karras_asked:  # use_karras_sigmas: fractional timesteps by log sigma
                return replace(base, spacing="karras")
            if spacing == "linspace":  # fractional t, sigma interpolated linearly, started at sigma_max
                return replace(base, timestep_input="sigma_linear")
            return replace(base, spacing=spacing, timestep_input="nearest", start_noise="vp" if spacing ==
                           "leading" else "sigma")  # fmt: skip
        if sampler == "ddim":  # DDIMScheduler, default "leading"; works in x_vp, so starts at unit variance
            if karras_asked or (self.config_spacing or "leading") != "leading":
                # its next timestep is t - N // n, which is the next one of the list only for "leading"
                raise UnnoiseError("diffusers' DDIMScheduler is matched with its leading spacing only")
            final = "zero" if self.set_alpha_to_one else "sigma_min"
            return replace(
                base, spacing="leading", timestep_input="nearest", start_noise="vp", final_sigma=final
            )
        if sampler == "dpmpp_2m":  # DPMSolverMultistepScheduler, default "linspace" (rounded)
            named = {"linspace": "linspace_rounded", "leading": "leading_dpm", "trailing": "trailing"}
            spacing = "karras" if karras_asked else named[self.config_spacing or "linspace"]
            return replace(base, spacing=spacing, timestep_input="nearest", start_noise="vp")
        raise UnnoiseError(
            f"the diffusers convention covers euler, euler_ancestral, ddim and dpmpp_2m (diffusers' Euler,"
            f" EulerAncestral, DDIM and DPMSolverMultistep schedulers), not {sampler}"
        )


# AUTOMATIC1111 1.9+: k-diffusion's samplers on CompVisDenoiser (fractional timesteps) over the model's
# float32 schedule, noise * sigma_max; "Automatic" is Karras for DPM++ 2M, exponential for the DPM++ SDE
# samplers (3M SDE dropping the next-to-last sigma), uniform in t for the others.
A1111 = Convention(
    name="a1111",
    timestep_input="fractional",
    schedule_precision="float32_alpha_bar",
    start_noise="sigma",
    automatic={
        "dpmpp_2m": "karras",
        "dpmpp_2m_sde": "exponential",
        "dpmpp_2m_sde_heun": "exponential",
        "dpmpp_3m_sde": "exponential",
    },
    automatic_default="uniform",
    drop_penultimate=frozenset({"dpmpp_3m_sde"}),
)
# ComfyUI: the nearest timestep is fed (ModelSamplingDiscrete.timestep), noise * sqrt(1 + sigma_max^2) for
# a full denoise; its "normal" scheduler is uniform in t. (Read from its source; not run here.)
COMFYUI = Convention(
    name="comfyui",
    timestep_input="nearest",
    schedule_precision="float32_sigmas",
    start_noise="vp",
    automatic_default="uniform",
)
CONVENTIONS = ("a1111", "comfyui", "diffusers")


def convention_named(name: str, scheduler_config: dict | None = None) -> Convention:
    """The preset called `name`; diffusers' reads the model's scheduler config."""
    if name == "a1111":
        return A1111
    if name == "comfyui":
        return COMFYUI
    if name == "diffusers":
        config = scheduler_config or {}
        return DiffusersConvention(
            name="diffusers",
            timestep_input="fractional",
            schedule_precision="float32",
            start_noise="sigma",
            config_spacing=config.get("timestep_spacing"),
            steps_offset=int(config.get("steps_offset", 0)),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        )
    raise UnnoiseError(f"unknown convention {name!r}; choose {', '.join(CONVENTIONS)}")
