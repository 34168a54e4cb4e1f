"""The settings of one generated image: defaults and checks in one place, and their AUTOMATIC1111 text.

`ImageSettings` is the inference twin of `TrainConfig`. The pipeline builds one per image (image i of a
request has seed + i), writes it into the image's PNG as AUTOMATIC1111's `parameters` text, and
`ImageSettings.from_parameters` reads it back, so `unnoise generate --from-png` re-creates the image.
The CLI's flags and the server's request fields take their defaults from here.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .diffusion.samplers import DEFAULT_SAMPLER  # written once, beside the samplers
from .errors import UnnoiseError

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance: uncond + w (cond - uncond); 1 is no guidance
# A release may carry its own (config.json "defaults", set by `unnoise defaults`): Pipeline.default_guidance
MAX_GUIDANCE = 30.0  # the largest a request or a release may ask for
# RePaint's default for inpainting: blocks of 2 steps, each run 5 times. On the shapes-32 shipped before
# issue 11 it took InpaintEval from 77% to 92%; today's, which follows stated places, scores 99.7% with and
# without it (docs/generation.md). resample=1 turns it off, five times faster.
REPAINT_JUMP, REPAINT_RESAMPLE = 2, 5
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes, with room for seed + i
MAX_IMAGES = 64

InpaintArea = Literal["whole", "masked"]
# What the regenerated part of an inpainting starts from before it is noised to the strength: the input
# ("original"), the colours around it spread in ("fill"), random noise ("noise") or flat grey ("nothing").
# AUTOMATIC1111's `inpainting_fill` numbers them 0 fill, 1 original, 2 latent noise, 3 latent nothing.
MaskedContent = Literal["original", "fill", "noise", "nothing"]
MASKED_CONTENTS: tuple[MaskedContent, ...] = ("fill", "original", "noise", "nothing")  # in A1111's order

# AUTOMATIC1111's sampler labels -> ours, one map for the CLI, the PNG text and the server. A1111 writes
# the schedule apart ("Schedule type: Karras"); its older labels carry it (" Karras"), both are read.
A1111_SAMPLERS: dict[str, str] = {
    "Euler": "euler",
    "Euler a": "euler_ancestral",
    "Heun": "heun",
    "DDIM": "ddim",
    "DDPM": "ddpm",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M SDE": "dpmpp_2m_sde",  # k-diffusion's algorithms under k-diffusion's names (samplers.py)
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "UniPC": "unipc",
}
A1111_LABELS: dict[str, str] = {ours: label for label, ours in A1111_SAMPLERS.items()}
# labels unnoise once wrote that are no AUTOMATIC1111 sampler: read (PNGs made then), never written
OLD_LABELS: dict[str, str] = {"DPM++ 3M": "dpmpp_3m"}
SCHEDULE_TYPE = "Karras"  # what A1111 calls the default schedule of every formulation here (rho = 7)
SCHEDULE_TYPES = ("Automatic", "Karras")  # the A1111 schedule types that name it for unnoise's own models
# every schedule type a model may run on: "Automatic" is the model's own choice for the sampler (Karras
# for unnoise's models; for a Stable Diffusion model its convention's, diffusion/conventions.py)
SCHEDULE_LABELS = ("Automatic", "Karras", "Exponential", "Uniform", "Leading", "Trailing", "Linspace")
# AUTOMATIC1111's second pass ("hires fix"): its "Denoising strength" belongs to that pass, not to an edit
HIRES_KEYS = ("Hires upscale", "Hires resize", "Hires steps", "Hires upscaler")
# what else an AUTOMATIC1111 PNG may describe that unnoise does not re-create
NOT_RECREATED = (*HIRES_KEYS, "Clip skip", "Face restoration", "Lora hashes", "TI hashes", "Refiner", "ENSD")


def sampler_name(name: str | None) -> str:
    """Our name for a sampler given by an AUTOMATIC1111 label ("Euler a", "DPM++ 2M Karras") or by ours;
    None or "" is the default. An unknown name is an UnnoiseError listing the known ones."""
    from .diffusion.samplers import SAMPLERS

    if not name:
        return DEFAULT_SAMPLER
    base = name.removesuffix(" Karras")
    if base in A1111_SAMPLERS:
        return A1111_SAMPLERS[base]
    if base in OLD_LABELS:
        return OLD_LABELS[base]
    if name in SAMPLERS:
        return name
    known = ", ".join(sorted({*A1111_SAMPLERS, *SAMPLERS}))
    raise UnnoiseError(f"unknown sampler {name!r}; known: {known}")


def a1111_label(sampler: str) -> str:
    """The AUTOMATIC1111 label of one of our samplers, or our name where A1111 has none (pc, rk45)."""
    return A1111_LABELS.get(sampler, sampler)


def sampler_options(sampler: str) -> dict[str, object]:
    """The options `sampler` takes beyond the common arguments, with their defaults (eta, s_churn, ...)."""
    from .diffusion.samplers import get_sampler

    common = {"denoiser", "x", "sigmas", "cond", "generator", "callback"}
    parameters = inspect.signature(get_sampler(sampler)).parameters.values()
    return {p.name: p.default for p in parameters if p.name not in common and p.kind == p.KEYWORD_ONLY}


@dataclass(frozen=True)
class ImageSettings:
    """Everything that determines one generated image (with the model and, for an edit, its input)."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = DEFAULT_SAMPLER
    sampler_options: Mapping[str, float] = field(default_factory=dict)  # e.g. {"eta": 0.5} for ddim
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0
    width: int | None = None  # None: the model's own size
    height: int | None = None
    model: str = ""
    model_hash: str = ""  # the first 10 hex digits of the weights' SHA-256, as AUTOMATIC1111 writes it
    variation_seed: int | None = None  # the noise is slerped variation_strength of the way to this seed's
    variation_strength: float = 0.0
    mix_prompt: str = ""  # the condition is lerped prompt_mix of the way to this prompt's
    prompt_mix: float = 0.0
    denoising_strength: float | None = None  # img2img and inpainting only
    mask_blur: int | None = None  # inpainting only: the feathering radius in input pixels
    inpaint_area: InpaintArea | None = (
        None  # inpainting only: "masked" when the model saw only the mask's area
    )
    masked_padding: int | None = None  # ... with this many pixels of context around it
    repaint_jump: int | None = None  # inpainting only: RePaint's block length and repeats
    repaint_resample: int | None = None
    masked_content: MaskedContent | None = None  # inpainting only: None is "original"
    # each noun's cross-attention bound to its attributes' ("a red circle and a blue square": the pixels
    # that read "red" read "circle"), see nn.layers.bind_attention
    bind_attributes: bool = False
    schedule: str = "Automatic"  # A1111's "Schedule type" (SCHEDULE_LABELS); the pipeline resolves Automatic

    def check(self) -> ImageSettings:
        """These settings, or an UnnoiseError that names the first one out of range."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise UnnoiseError("the prompt and the negative prompt must be strings")
        known = sampler_options(self.sampler)  # also checks the sampler's name
        unknown = sorted(set(self.sampler_options) - set(known))
        if unknown:
            takes = ", ".join(sorted(known)) or "no options"
            raise UnnoiseError(
                f"the sampler {self.sampler!r} has no option {', '.join(unknown)} (it takes {takes})"
            )
        for name, value in self.sampler_options.items():
            _finite(value, f"the sampler option {name}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise UnnoiseError(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        _finite(self.guidance, "guidance")
        for name in ("seed", "variation_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_SEED:
                raise UnnoiseError(f"{name.replace('_', ' ')} must be in 0..{MAX_SEED}, got {value}")
        for name in ("variation_strength", "prompt_mix", "denoising_strength"):
            value = getattr(self, name)
            if value is not None and not 0 <= _finite(value, name.replace("_", " ")) <= 1:
                raise UnnoiseError(f"{name.replace('_', ' ')} must be in [0, 1], got {value}")
        for name in ("mask_blur", "masked_padding"):
            if (getattr(self, name) or 0) < 0:
                raise UnnoiseError(
                    f"{name.replace('_', ' ')} must be 0 or more pixels, got {getattr(self, name)}"
                )
        for name in ("repaint_jump", "repaint_resample"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UnnoiseError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.inpaint_area not in (None, "whole", "masked"):
            raise UnnoiseError(f"the inpaint area must be 'whole' or 'masked', got {self.inpaint_area!r}")
        if not isinstance(self.bind_attributes, bool):
            raise UnnoiseError(f"attribute binding must be true or false, got {self.bind_attributes!r}")
        if self.bind_attributes and self.prompt_mix:
            raise UnnoiseError("attribute binding needs one prompt; it cannot be used with a prompt mix")
        if not isinstance(self.schedule, str) or self.schedule.lower() not in {
            label.lower() for label in SCHEDULE_LABELS
        }:
            raise UnnoiseError(
                f"unknown schedule type {self.schedule!r}; choose {', '.join(SCHEDULE_LABELS)}"
            )
        if self.masked_content not in (None, *MASKED_CONTENTS):
            raise UnnoiseError(
                f"the masked content must be one of {', '.join(MASKED_CONTENTS)}, got {self.masked_content!r}"
            )
        return self

    def replace(self, **changes) -> ImageSettings:
        return dataclasses.replace(self, **changes)

    # --- AUTOMATIC1111's `parameters` text ---------------------------------------------------------------

    def parameters(self) -> str:
        """AUTOMATIC1111's `parameters` text: prompt, negative prompt line, then key: value pairs."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        if self.prompt_mix:
            lines.append(f"Mix prompt: {self.mix_prompt}")
        pairs = [
            f"Steps: {self.steps}",
            f"Sampler: {a1111_label(self.sampler)}",
            f"Schedule type: {self.schedule}",  # the pipeline resolves Automatic to the one it ran on
            *(f"{_option_key(k)}: {_number(v)}" for k, v in sorted(self.sampler_options.items())),
            f"CFG scale: {self.guidance:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            *([f"Model hash: {self.model_hash}"] if self.model_hash else []),
            f"Model: {self.model}",
        ]
        if self.variation_seed is not None and self.variation_strength:
            pairs += [
                f"Variation seed: {self.variation_seed}",
                f"Variation seed strength: {_number(self.variation_strength)}",
            ]
        if self.prompt_mix:
            pairs.append(f"Prompt mix: {_number(self.prompt_mix)}")
        if self.denoising_strength is not None:
            pairs.append(f"Denoising strength: {_number(self.denoising_strength)}")
        if self.mask_blur is not None:
            pairs.append(f"Mask blur: {self.mask_blur}")
        if self.inpaint_area == "masked":
            pairs += ["Inpaint area: Only masked", f"Masked area padding: {self.masked_padding}"]
        if self.repaint_jump is not None:
            pairs += [f"RePaint jump: {self.repaint_jump}", f"RePaint resample: {self.repaint_resample}"]
        if self.masked_content not in (None, "original"):
            pairs.append(f"Masked content: {self.masked_content}")
        if self.bind_attributes:
            pairs.append("Attribute binding: on")
        lines.append(", ".join(pairs))
        return "\n".join(lines)

    @classmethod
    def from_parameters(cls, text: str) -> ImageSettings:
        """Parse the `parameters` text written by `parameters()` (or by AUTOMATIC1111, for these keys)."""
        lines = text.strip().splitlines()
        if not lines or not lines[-1].startswith("Steps:"):
            raise UnnoiseError("the PNG's parameters do not end with a 'Steps: ...' line")
        values = {k.strip(): v.strip() for k, v in re.findall(r"\s*([\w ]+):\s*([^,]*)", lines[-1])}
        labelled = {"Negative prompt:": "", "Mix prompt:": ""}
        prompt_lines = []
        for line in lines[:-1]:
            label = next((name for name in labelled if line.startswith(name)), None)
            if label is None:
                prompt_lines.append(line)
            else:
                labelled[label] = line.removeprefix(label).strip()

        def optional(key: str, kind):
            return kind(values[key]) if key in values else None

        hires = any(key in values for key in HIRES_KEYS)

        try:
            width, height = (int(v) for v in values["Size"].split("x")) if "Size" in values else (None, None)
            sampler = sampler_name(values.get("Sampler"))
            schedule = values.get("Schedule type", "Automatic")
            if values.get("Sampler", "").endswith(" Karras"):
                schedule = "Karras"
            known = {t.lower(): t for t in SCHEDULE_LABELS}
            if schedule.lower() not in known:
                raise UnnoiseError(
                    f"the PNG was made with the {schedule!r} schedule, which unnoise does not have, so it"
                    " cannot make that image again"
                )
            schedule = known[schedule.lower()]
            options = {k: float(values[_option_key(k)]) for k in _all_options() if _option_key(k) in values}
            return cls(
                prompt="\n".join(prompt_lines),
                negative_prompt=labelled["Negative prompt:"],
                sampler=sampler,
                sampler_options={k: v for k, v in options.items() if k in sampler_options(sampler)},
                steps=int(values["Steps"]),
                guidance=float(values.get("CFG scale", DEFAULT_GUIDANCE)),
                seed=int(values["Seed"]),
                width=width,
                height=height,
                model=values.get("Model", ""),
                model_hash=values.get("Model hash", ""),
                variation_seed=optional("Variation seed", int),
                variation_strength=float(values.get("Variation seed strength", 0.0)),
                mix_prompt=labelled["Mix prompt:"],
                prompt_mix=float(values.get("Prompt mix", 0.0)),
                denoising_strength=None if hires else optional("Denoising strength", float),
                mask_blur=optional("Mask blur", int),
                inpaint_area="masked" if values.get("Inpaint area") == "Only masked" else None,
                masked_padding=optional("Masked area padding", int),
                repaint_jump=optional("RePaint jump", int),
                repaint_resample=optional("RePaint resample", int),
                masked_content=values.get("Masked content"),
                bind_attributes=values.get("Attribute binding") == "on",
                schedule=schedule,
            )
        except (KeyError, ValueError) as error:
            raise UnnoiseError(f"the PNG's parameters are incomplete or malformed ({error})") from None


def not_recreated(text: str) -> list[str]:
    """The parts of a `parameters` text (AUTOMATIC1111's) that `from_parameters` drops: "Hires upscale: 2",
    "Clip skip: 2", ... A re-created image is that of the first pass, without them."""
    found = re.findall(r"\s*([\w ]+):\s*([^,]*)", text.strip().splitlines()[-1]) if text.strip() else []
    return [f"{k.strip()}: {v.strip()}" for k, v in found if k.strip() in NOT_RECREATED]


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UnnoiseError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _option_key(name: str) -> str:
    """A sampler option's key in the parameters text: eta -> "Eta", s_churn -> "S churn"."""
    return name.replace("_", " ").capitalize()


def _all_options() -> set[str]:
    from .diffusion.samplers import SAMPLERS

    return {name for sampler in SAMPLERS for name in sampler_options(sampler)}


def _number(value: float) -> str:
    """Shortest text that reads back as the same float (0.5, not 0.5000; 1/3 in full)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))
