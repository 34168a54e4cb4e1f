"""Single-file Stable Diffusion checkpoints: the `.safetensors` files AUTOMATIC1111 and ComfyUI load.

Such a file holds the UNet (`model.diffusion_model.`), the VAE (`first_stage_model.`) and the text encoder
(`cond_stage_model.`) in CompVis' key layout, and no config. The config comes from a local diffusers folder
of the same family (`config_from`: its part configs, tokenizer and scheduler) or from the configs that ship
with unnoise for SD 1.x and SD 2.x (below, with CLIP's BPE vocabulary, `configs/clip_bpe_16e6.txt.gz`, MIT,
from OpenAI's CLIP via OpenCLIP); never from the network. diffusers' own converters rename the keys; the
parts are built on the `meta` device and take the file's tensors as they are (nothing is copied twice).

An SD 2.x file does not say whether it predicts epsilon (SD 2 base, 512 px) or v (SD 2 768-v): it is refused
unless told (`prediction_type`, or a `.yaml` beside it naming `parameterization: "v"`, as AUTOMATIC1111
reads it). SDXL and other families are named and refused.
"""

from __future__ import annotations

import functools
import gzip
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import UnnoiseError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_MARK = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


@dataclass(frozen=True)
class Family:
    """What unnoise ships for one family: its part configs (diffusers' names) and text encoder's."""

    name: str
    unet: dict[str, Any]
    text: dict[str, Any]
    pad_token: str  # SD 2's OpenCLIP tokenizer pads with "!", SD 1's CLIP with <|endoftext|>


VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
}  # fmt: skip
UNET_COMMON = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}  # fmt: skip
FAMILIES = {
    "sd1": Family(
        "SD 1.x",
        {**UNET_COMMON, "cross_attention_dim": 768, "attention_head_dim": 8},
        {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
         "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
         "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        "<|endoftext|>",
    ),
    "sd2": Family(
        "SD 2.x",
        {**UNET_COMMON, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
         "use_linear_projection": True},
        {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
         "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu",
         "projection_dim": 512, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0},
        "!",
    ),
}  # fmt: skip
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "set_alpha_to_one": False}  # fmt: skip


def is_single_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".safetensors"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors (safetensors only; the reader maps the file rather than copying it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError) as error:
        raise UnnoiseError(f"{path}: not a readable safetensors file ({error})") from None


def family_of(path: Path, keys: set[str]) -> str:
    if SDXL_MARK in keys or any(k.startswith("conditioner.") for k in keys):
        raise UnnoiseError(f"{path}: an SDXL checkpoint; SDXL is not supported yet (SD 1.x and 2.x are)")
    if not any(k.startswith(UNET) for k in keys) or not any(k.startswith(VAE) for k in keys):
        raise UnnoiseError(
            f"{path}: not a Stable Diffusion checkpoint (no {UNET}* or {VAE}* weights): a LoRA or another"
            " model? A LoRA is given with --lora"
        )
    if any(k.startswith(SD2_TEXT) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT) for k in keys):
        return "sd1"
    raise UnnoiseError(
        f"{path}: a checkpoint whose text encoder unnoise does not know (neither SD 1 nor SD 2)"
    )


def prediction_hint(path: Path, given: str | None) -> str | None:
    """epsilon or v_prediction: as given, or from a `.yaml` beside the file (A1111's convention)."""
    if given is not None:
        named = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
        if given not in named:
            raise UnnoiseError(f"prediction type must be epsilon or v, got {given!r}")
        return named[given]
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        text = yaml.read_text(errors="replace")
        if re.search(r"parameterization:\s*[\"']?v[\"']?\s*$", text, re.M):
            return "v_prediction"
        return "epsilon"
    return None


@functools.cache
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (49408 tokens) and merges, as OpenAI's CLIP builds them from its merges file."""
    data = resources.files("unnoise").joinpath("configs/clip_bpe_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    characters = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    tokens = [*characters, *(c + "</w>" for c in characters), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str):
    import transformers

    vocab, merges = clip_vocabulary()
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def part_state(prefix: str, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint.items() if k.startswith(prefix)}


def assign(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> torch.nn.Module:
    """The model (built on `meta`) with the file's tensors as its own; a mismatch names the keys."""
    own = model.state_dict()
    if not any(k.startswith("text_model.") for k in own):  # transformers 5's CLIP has no text_model level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing = sorted(
        set(own) - set(state) - {"embeddings.position_ids", "text_model.embeddings.position_ids"}
    )
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or wrong:
        said = ", ".join((missing + wrong)[:3])
        raise UnnoiseError(
            f"{path}: its {what} does not fit the config ({len(missing)} missing, {len(wrong)} of another"
            f" shape, e.g. {said}): another family, or a config of another model"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False, assign=True)
    for name, buffer in model.named_buffers():  # buffers the file does not hold (position ids) are made
        if buffer.is_meta:
            raise UnnoiseError(f"{path}: {what} buffer {name} was not in the file")
    return model.eval().requires_grad_(False)


def load_single_file(
    path: str | Path,
    device: torch.device,
    *,
    clip_skip: int = 1,
    convention: str = "a1111",
    precision: str = "float32",
    prediction_type: str | None = None,
    config_from: str | Path | None = None,
):
    """A single-file checkpoint's parts (`StableDiffusionParts`), its config from `config_from` (a local
    diffusers folder) or the family's shipped one."""
    from .stable_diffusion import (
        PRECISIONS,
        SchedulerConfig,
        assemble,
        read_json,
        require_diffusers,
    )  # fmt: skip

    diffusers = require_diffusers()
    import transformers
    from diffusers.loaders import single_file_utils as convert

    path = Path(path)
    if precision not in PRECISIONS:
        raise UnnoiseError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    checkpoint = read_checkpoint(path)
    family = family_of(path, set(checkpoint))
    hint = prediction_hint(path, prediction_type)
    if config_from is not None:
        folder = Path(config_from)
        unet_config = read_json(folder / "unet" / "config.json")
        vae_config = read_json(folder / "vae" / "config.json")
        text_config = transformers.CLIPTextConfig(**read_json(folder / "text_encoder" / "config.json"))
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        scheduler = SchedulerConfig.read(folder / "scheduler" / "scheduler_config.json")
        if hint is not None:
            scheduler = SchedulerConfig(**{**scheduler.__dict__, "prediction_type": hint})
    else:
        if family == "sd2" and hint is None:
            raise UnnoiseError(
                f"{path}: an SD 2.x checkpoint does not say whether it predicts epsilon (SD 2 base, 512 px)"
                " or v (SD 2 768-v): give --prediction-type epsilon or v (or a .yaml beside it, as for A1111)"
            )
        shipped = FAMILIES[family]
        v = hint == "v_prediction"
        unet_config = {**shipped.unet, "sample_size": 96 if v else 64}
        vae_config = {**VAE_CONFIG, "sample_size": 768 if v else 512}
        text_config = transformers.CLIPTextConfig(**shipped.text)
        tokenizer = clip_tokenizer(shipped.pad_token)
        scheduler = SchedulerConfig(**SCHEDULER, prediction_type=hint or "epsilon")
    dtype = PRECISIONS[precision]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
        vae = diffusers.AutoencoderKL.from_config(vae_config)
    unet = assign(unet, convert.convert_ldm_unet_checkpoint(checkpoint, unet.config), "UNet", path)
    vae = assign(vae, convert.convert_ldm_vae_checkpoint(checkpoint, vae.config), "VAE", path)
    text_model = transformers.CLIPTextModel(text_config)
    if family == "sd1":
        text_state = convert.convert_ldm_clip_checkpoint(checkpoint)
    else:
        text_state = convert.convert_open_clip_checkpoint(text_model, checkpoint, prefix=SD2_TEXT)
    text_model = assign(text_model, text_state, "text encoder", path)
    return assemble(
        path.stem, path, unet.to(dtype), vae.float(), text_model.to(dtype), tokenizer, scheduler, device,
        clip_skip=clip_skip, convention=scheduler.convention(convention),
    )  # fmt: skip
