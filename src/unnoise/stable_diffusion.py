"""Stable Diffusion models users already have, behind unnoise's one denoiser interface (issue 32).

A diffusers folder (`model_index.json`: UNet2DConditionModel, AutoencoderKL, a CLIP text encoder and
tokenizer, a scheduler config) becomes a `Pipeline` of three unnoise parts:

- the **denoiser**: diffusers' UNet as the network F, joined to the discrete VP formulation its scheduler
  config describes (`VPDiscrete`: the betas, `num_train_timesteps`, epsilon or v prediction); the UNet is
  fed the fractional timestep of each sigma (log-sigma interpolation, as k-diffusion and so AUTOMATIC1111
  and ComfyUI feed it) and the input scaled by 1 / sqrt(1 + sigma^2);
- the **text encoder**: CLIP's tokenizer padded to its 77 positions and its text model, the states of the
  last layer or, with `clip_skip` = k as AUTOMATIC1111 counts it, of the k-th layer from the end, with
  the final layer norm still applied;
- the **codec**: the VAE through the image codec seam (`codec.py`), its latents scaled by the
  `scaling_factor` of its config (0.18215 for SD 1 and 2), decoded in float32 whatever the weights' type.

Every unnoise sampler, guidance, seed, img2img, inpainting, preview and the server then work on it.
Weights are read from safetensors only (diffusers' `use_safetensors=True`); a folder that has only
`.bin` files is refused with the conversion to run, never unpickled. diffusers is the optional extra
`unnoise[diffusers]`; nothing here is imported before such a folder is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .diffusion.conventions import Convention, convention_named
from .diffusion.formulations import VPDiscrete
from .errors import UnnoiseError
from .text.encoders import TextEmbedding, check_prompts, no_progress_bars

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
PICKLED = (".bin", ".ckpt", ".pt", ".pth")
SD_GUIDANCE = 7.0  # AUTOMATIC1111's default CFG scale for these models


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` that is no path on this machine: a Hugging Face model id."""
    return bool(HUB_ID.fullmatch(str(name))) and not Path(name).exists()


def hub_folder(repo_id: str) -> Path:
    """A Hugging Face model id's diffusers folder, downloaded (safetensors only) by diffusers' own mechanism
    into its cache, or found there; offline or unknown, one line that says so."""
    diffusers = require_diffusers()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # its "couldn't connect" warning: the error says it
    try:
        with no_progress_bars():
            return Path(diffusers.DiffusionPipeline.download(repo_id, use_safetensors=True))
    except Exception as error:  # huggingface_hub raises many kinds; each is the same answer here
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnnoiseError(
            f"no local model {repo_id!r}, and cannot get it from the Hugging Face Hub (offline, or no such"
            " diffusers model?):"
            f" {first[:160]}"
        ) from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def weights_file(folder: str | Path) -> Path | None:
    """The file a Stable Diffusion model's hash is taken from (the UNet's weights: AUTOMATIC1111 hashes the
    checkpoint, which for a diffusers folder is split by part), or None if it has none."""
    return next(iter(sorted((Path(folder) / "unet").glob("*.safetensors"))), None)


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise UnnoiseError(
            'Stable Diffusion models need the diffusers extra: pip install "unnoise[diffusers]"'
        ) from None
    return diffusers


# --- the schedule the scheduler config describes ---------------------------------------------------------


@dataclass(frozen=True)
class SchedulerConfig:
    """What unnoise reads from a diffusers `scheduler_config.json`."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    timestep_spacing: str | None = None  # None: each scheduler class's own default
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    @classmethod
    def read(cls, path: Path) -> SchedulerConfig:
        values = read_json(path)
        config = cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})
        if config.prediction_type not in PREDICTION_TYPES:
            raise UnnoiseError(
                f"{path}: prediction_type {config.prediction_type!r} is none of {', '.join(PREDICTION_TYPES)}"
            )
        if config.beta_schedule not in ("linear", "scaled_linear"):
            raise UnnoiseError(f"{path}: beta_schedule {config.beta_schedule!r} is not supported yet")
        if config.timestep_spacing not in (None, "leading", "trailing", "linspace"):
            raise UnnoiseError(f"{path}: timestep_spacing {config.timestep_spacing!r} is not supported")
        return config

    def formulation(self) -> VPDiscrete:
        return VPDiscrete(
            parametrization=PREDICTION_TYPES[self.prediction_type],
            beta_schedule=self.beta_schedule,
            num_timesteps=self.num_train_timesteps,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            terminal_snr="zero" if self.rescale_betas_zero_snr else "as_trained",
        )

    def convention(self, name: str) -> Convention:
        """The preset `name` (a1111, comfyui, diffusers), diffusers' reading this config's spacing."""
        return convention_named(
            name,
            {"timestep_spacing": self.timestep_spacing, "steps_offset": self.steps_offset,
             "set_alpha_to_one": self.set_alpha_to_one},
        )  # fmt: skip


def read_json(path: Path) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise UnnoiseError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(values, dict):
        raise UnnoiseError(f"{path}: a JSON object was expected")
    return values


# --- the three parts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDNetworkShape:
    """What the Pipeline asks of a network's config: the latent side and the side's step."""

    resolution: int
    stride: int


class DiffusersUNet(nn.Module):
    """F(x_in, c_noise, cond) = unet(x_in, t = c_noise, encoder_hidden_states = cond.tokens).sample."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        downsamplings = len(unet.config.block_out_channels) - 1
        self.config = SDNetworkShape(resolution=unet.config.sample_size, stride=2**downsamplings)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: TextEmbedding) -> torch.Tensor:
        states = cond.tokens.to(self.unet.dtype)  # (B, 77, D)
        return self.unet(x.to(self.unet.dtype), c_noise, encoder_hidden_states=states).sample


class CLIPTextEncoder:
    """CLIP's tokenizer and text model as unnoise's text encoder: (B, 77, D) states, all positions real."""

    def __init__(self, tokenizer, model: nn.Module, name: str, clip_skip: int = 1):
        if clip_skip < 1 or clip_skip > model.config.num_hidden_layers:
            raise UnnoiseError(f"clip skip must be 1..{model.config.num_hidden_layers}, got {clip_skip}")
        self.tokenizer, self.model, self.clip_skip = tokenizer, model.eval().requires_grad_(False), clip_skip
        self.dim = model.config.hidden_size
        self.max_tokens = tokenizer.model_max_length  # 77
        self.name = f"{name}:clip-skip-{clip_skip}"
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEmbedding:
        prompts = check_prompts(prompts)
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)  # (B, 77)
        out = self.model(ids, output_hidden_states=self.clip_skip > 1)
        if self.clip_skip == 1:
            states = out.last_hidden_state  # the final layer norm applied
        else:  # AUTOMATIC1111's clip skip: an earlier layer, then the final layer norm as for the last
            states = final_layer_norm(self.model)(out.hidden_states[-self.clip_skip])
        states = states.float()  # (B, 77, D)
        mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        end = ids.argmax(-1)  # the end-of-text token (the highest id), where CLIP pools (unused by the UNet)
        return TextEmbedding(states, mask, states[torch.arange(len(ids)), end])

    def token_strings(self, prompt: str) -> list[str]:
        return self.tokenizer.tokenize(prompt)


def final_layer_norm(model: nn.Module) -> nn.Module:
    """CLIP's final layer norm: `text_model.final_layer_norm` before transformers 5, `final_layer_norm` on."""
    inner = getattr(model, "text_model", model)
    return inner.final_layer_norm


class VAECodec:
    """diffusers' AutoencoderKL as an image codec: z = scaling_factor * (mean of the posterior)."""

    def __init__(self, vae: nn.Module, name: str = "vae"):
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels
        self.fingerprint = f"{name}:{self.scaling}"

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.vae.dtype)  # (B, 3, H, W) in [-1, 1]
        mean = self.vae.encode(x).latent_dist.mean.float()  # (B, c, H/f, W/f)
        return (mean - self.shift) * self.scaling

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """In float32 whatever the weights' type: half precision overflows in SD's decoder."""
        vae = self.vae if self.vae.dtype == torch.float32 else self.vae.float()
        pixels = vae.decode(z.float() / self.scaling + self.shift).sample
        return pixels.clamp(-1, 1)

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

    def to(self, device: torch.device | str) -> VAECodec:
        self.vae.to(device)
        return self


# --- loading ---------------------------------------------------------------------------------------------


def check_safetensors(folder: Path, part: str) -> None:
    """A part folder must hold safetensors weights: pickled ones are refused with the conversion to run."""
    where = folder / part
    if not where.is_dir():
        raise UnnoiseError(f"{folder} is a diffusers folder without {part}/")
    if any(where.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in where.iterdir() if p.suffix in PICKLED)
    if pickled:
        raise UnnoiseError(
            f"{where} holds only pickled weights ({', '.join(pickled)}), which unnoise never loads (a pickle"
            " can run code). Convert them once where you trust the file: load the pipeline with diffusers"
            " and save_pretrained(folder, safe_serialization=True)"
        )
    raise UnnoiseError(f"{where} has no weights (no .safetensors file)")


def check_part_fits(where: Path, build) -> None:
    """The part its config.json describes, built on PyTorch's meta device (nothing allocated), against the
    shapes in its safetensors headers: a config that asks for more (or other) than the weights hold is one
    line before anything is allocated (diffusers would build it at full size first)."""
    from .release import tensor_shapes

    config = read_json(where / "config.json")
    try:
        with torch.device("meta"):
            model = build(config)
    except Exception as error:  # a config diffusers or transformers cannot build: say so, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnnoiseError(f"{where}/config.json does not describe a model ({first[:160]})") from None
    found: dict[str, tuple[int, ...]] = {}
    for weights in sorted(where.glob("*.safetensors")):
        try:
            found |= tensor_shapes(weights)
        except Exception:  # a cut or damaged header: diffusers' loader names it (load_part)
            return
    found = {k.removeprefix("text_model."): v for k, v in found.items()}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("text_model.")
        if name in found and tuple(tensor.shape) != found[name]:
            raise UnnoiseError(
                f"{where}: config.json makes {name} {tuple(tensor.shape)} but the weights hold {found[name]}"
            )
        if name not in found and not name.endswith("position_ids"):
            raise UnnoiseError(f"{where}: config.json makes {name}, which the weights do not hold")


def load_part(where: Path, kind, **options):
    """`kind.from_pretrained(where)`, its failure (a missing or damaged file) one line that names the part."""
    try:
        with no_progress_bars():
            return kind.from_pretrained(where, **options)
    except (OSError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnnoiseError(f"{where}: cannot load this {kind.__name__} ({first})") from None


@dataclass
class StableDiffusionParts:
    """What a diffusers folder or a single file becomes; `pipeline.load` builds the pipeline from these."""

    name: str
    weights: Path  # the file A1111's model hash is taken from
    denoiser: nn.Module  # Denoiser(DiffusersUNet, VPDiscrete)
    text: CLIPTextEncoder
    codec: VAECodec
    resolution: int  # pixels
    stride: int  # pixels
    convention: Convention
    default_guidance: float = SD_GUIDANCE


def assemble(
    name: str, weights: Path, unet, vae, text_model, tokenizer, scheduler: SchedulerConfig,
    device: torch.device, *, clip_skip: int, convention: Convention,
) -> StableDiffusionParts:  # fmt: skip
    """The parts from diffusers' UNet and VAE and transformers' CLIP, loaded and in their precision."""
    from .diffusion.denoiser import Denoiser

    network = DiffusersUNet(unet.eval().requires_grad_(False))
    codec = VAECodec(vae, name=f"{name}:vae").to(device)
    return StableDiffusionParts(
        name=name,
        weights=weights,
        denoiser=Denoiser(network, scheduler.formulation()).to(device),
        text=CLIPTextEncoder(tokenizer, text_model.to(device), name=name, clip_skip=clip_skip),
        codec=codec,
        resolution=network.config.resolution * codec.factor,
        stride=network.config.stride * codec.factor,
        convention=convention,
    )


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_stable_diffusion(
    folder: str | Path,
    device: torch.device,
    *,
    clip_skip: int = 1,
    convention: str = "a1111",
    precision: str = "float32",
) -> StableDiffusionParts:
    """A diffusers Stable Diffusion folder's parts, checked, on `device`."""
    folder = Path(folder)
    diffusers = require_diffusers()
    import transformers

    index = read_json(folder / "model_index.json")
    for part in ("unet", "vae", "text_encoder"):
        check_safetensors(folder, part)
    for part in ("tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise UnnoiseError(f"{folder} is a diffusers folder without {part}/")
    if "text_encoder_2" in index:
        raise UnnoiseError(f"{folder}: SDXL (two text encoders) is not supported yet; SD 1.x and 2.x are")
    scheduler = SchedulerConfig.read(folder / "scheduler" / "scheduler_config.json")
    sampling = scheduler.convention(convention)  # checked before any weight is read
    if precision not in PRECISIONS:
        raise UnnoiseError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    common: dict[str, Any] = {"use_safetensors": True, "local_files_only": True}
    weights = {**common, "torch_dtype": PRECISIONS[precision]}  # the UNet's and text encoder's
    check_part_fits(folder / "unet", diffusers.UNet2DConditionModel.from_config)
    check_part_fits(folder / "vae", diffusers.AutoencoderKL.from_config)
    check_part_fits(
        folder / "text_encoder", lambda c: transformers.CLIPTextModel(transformers.CLIPTextConfig(**c))
    )
    unet = load_part(folder / "unet", diffusers.UNet2DConditionModel, **weights)
    vae = load_part(folder / "vae", diffusers.AutoencoderKL, **common, torch_dtype=torch.float32)
    text_model = load_part(folder / "text_encoder", transformers.CLIPTextModel, **weights)
    tokenizer = load_part(folder / "tokenizer", transformers.CLIPTokenizer, local_files_only=True)
    from .release import model_name

    return assemble(
        model_name(folder), weights_file(folder), unet, vae, text_model, tokenizer, scheduler, device,
        clip_skip=clip_skip, convention=sampling,
    )  # fmt: skip
