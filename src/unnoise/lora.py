"""LoRA files users have, applied to a Stable Diffusion pipeline's UNet and text encoder (issue 32 point 4).

A LoRA (Hu et al. 2021) adds to a layer W a low-rank update: W x + scale * (alpha / r) * up(down(x)), with
down (r, in) and up (out, r), or their 1x1 / kxk convolution forms. Two layouts are read:

- **kohya-ss**: `lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight` and an optional
  `.alpha` (alpha / r; without one the factor is 1), `lora_te_` (`lora_te1_`, `lora_te2_`) for the text
  encoder;
- **diffusers / PEFT**: `unet.<module path>.lora_A.weight` / `.lora_B.weight` (or `.lora.down.weight` /
  `.lora.up.weight`), `text_encoder.` for the text encoder, `base_model.model.` prefixes, and an optional
  `.alpha` key or `lora_alpha` in the file's metadata (without one, alpha = r).

Kinds not supported (LoHa `hada_`, LoKr `lokr_`, DoRA `dora_scale`, `lora_mid`) and keys that match no
layer are errors that name the keys, never a silent no-op. The update is applied as a forward hook (the
weights stay untouched, so scale 0 is the base model bit for bit and a LoRA can be taken off), or merged
into the weights (`merge`, measured in benchmarks/lora_apply.py). Files are read with safetensors only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UnnoiseError

UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_mid": "LoCon's lora_mid"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text", "lora_te1_": "text"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text"}
PAIRS = (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"),
         ("lora.down.weight", "lora.up.weight"))  # fmt: skip


@dataclass
class LoraLayer:
    """One layer's update: down (r, in[, k, k]), up (out, r[, 1, 1]) and alpha / r."""

    part: str  # "unet" or "text"
    module: str  # the module's name in that part, dots
    down: torch.Tensor
    up: torch.Tensor
    factor: float  # alpha / r

    def delta(self) -> torch.Tensor:
        """factor * up @ down, shaped like the layer's weight (float32)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (self.factor * up @ down).reshape(self.up.shape[0], *self.down.shape[1:])


def read_lora(path: str | Path) -> list[LoraLayer]:
    """The layers a LoRA file holds, checked; an UnnoiseError names what is wrong."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UnnoiseError(
            f"{path}: LoRA files are read as .safetensors only (a {path.suffix or 'file'} may be a pickle,"
            " which unnoise never loads); convert it once where you trust it"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as error:
        raise UnnoiseError(f"{path}: not a readable safetensors file ({error})") from None
    unsupported = sorted(k for k in tensors if any(mark in k for mark in UNSUPPORTED))
    if unsupported:
        kinds = sorted({name for mark, name in UNSUPPORTED.items() if any(mark in k for k in unsupported)})
        raise UnnoiseError(
            f"{path}: {', '.join(kinds)} is not supported (plain LoRA only); keys such as"
            f" {', '.join(unsupported[:3])}"
        )
    return pair_layers(path, tensors, metadata)


def pair_layers(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[LoraLayer]:
    layers, used = [], set()
    peft_alpha = peft_alpha_of(metadata)
    for key in sorted(tensors):
        for down_name, up_name in PAIRS:
            if not key.endswith("." + down_name):
                continue
            stem = key[: -len(down_name) - 1]
            up_key = f"{stem}.{up_name}"
            if up_key not in tensors:
                raise UnnoiseError(f"{path}: {key} has no {up_key}")
            down, up = tensors[key], tensors[up_key]
            rank = down.shape[0]
            part, module = locate(stem)
            alpha_key = f"{stem}.alpha"
            if alpha_key in tensors:
                alpha = float(tensors[alpha_key])
            else:
                peft = down_name == "lora_A.weight" and peft_alpha is not None
                alpha = peft_alpha if peft else rank
            used |= {key, up_key, alpha_key}
            layers.append(LoraLayer(part, module, down, up, alpha / rank))
    unread = sorted(set(tensors) - used)
    if unread:
        raise UnnoiseError(f"{path}: keys that are no LoRA layer: {', '.join(unread[:5])}")
    if not layers:
        raise UnnoiseError(f"{path}: no LoRA layers in this file")
    return layers


def peft_alpha_of(metadata: dict[str, str]) -> float | None:
    """PEFT's `lora_alpha` from a file's metadata (diffusers writes the adapter config there), or None."""
    for key in ("lora_alpha", "lora_adapter_metadata"):
        try:
            value = json.loads(metadata[key])
        except (KeyError, ValueError):
            continue
        if isinstance(value, dict):
            value = value.get("lora_alpha")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def locate(stem: str) -> tuple[str, str]:
    """(part, module name with dots or underscores) of a key's stem, in either layout."""
    stem = stem.removeprefix("base_model.model.")
    for prefix, part in KOHYA_PREFIXES.items():
        if stem.startswith(prefix):
            return part, stem[len(prefix) :]
    for prefix, part in PEFT_PREFIXES.items():
        if stem.startswith(prefix):
            return part, stem[len(prefix) :]
    return "unet", stem  # PEFT saved from the UNet alone


def normalised(name: str) -> str:
    """A module name as both layouts can be matched on: underscores for dots, CLIP's `text_model` dropped."""
    name = name.replace(".", "_")
    return re.sub(r"^text_model_", "", name)


class LoraHook:
    """The forward hook that adds scale * delta(x) to one layer's output."""

    def __init__(self, module: nn.Module, layer: LoraLayer, scale: float):
        self.scale = scale
        weight = module.weight
        self.down = layer.down.to(weight.device, weight.dtype)
        self.up = layer.up.to(weight.device, weight.dtype)
        self.factor = layer.factor
        self.conv = isinstance(module, nn.Conv2d)
        self.module = module

    def __call__(self, module: nn.Module, inputs, output):
        (x,) = inputs[:1]
        if self.conv:
            m = self.module
            down = self.down if self.down.ndim == 4 else self.down[:, :, None, None]
            up = self.up if self.up.ndim == 4 else self.up[:, :, None, None]
            h = nn.functional.conv2d(x, down, stride=m.stride, padding=m.padding, dilation=m.dilation)
            return output + (self.scale * self.factor) * nn.functional.conv2d(h, up)
        down = self.down.flatten(1)
        return output + (self.scale * self.factor) * nn.functional.linear(
            nn.functional.linear(x, down), self.up.flatten(1)
        )


def module_table(parts: dict[str, nn.Module]) -> dict[tuple[str, str], nn.Module]:
    """(part, normalised name) -> layer, for every Linear and Conv2d of each part."""
    table = {}
    for part, root in parts.items():
        for name, module in root.named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                table[(part, normalised(name))] = module
    return table


def attach(
    parts: dict[str, nn.Module], layers: list[LoraLayer], scale: float, *, source: str, merge: bool = False
) -> list:
    """Apply `layers` at `scale` to the parts ({"unet": ..., "text": ...}): hooks (returned, to be removed)
    or, with `merge`, added into the weights in float32. Scale 0 changes nothing. Keys that match no layer,
    or whose shapes do not fit it, are an UnnoiseError naming them."""
    table = module_table(parts)
    found, missing = [], []
    for layer in layers:
        module = table.get((layer.part, normalised(layer.module)))
        if module is None:
            missing.append(f"{layer.part}:{layer.module}")
            continue
        shape = (layer.up.shape[0], layer.down.shape[1])  # (out, in) of up @ down
        if tuple(module.weight.shape[:2]) != shape:
            raise UnnoiseError(
                f"{source}: {layer.module} is {shape} but the model's layer is"
                f" {tuple(module.weight.shape)}: a LoRA for another model"
            )
        found.append((module, layer))
    if missing:
        raise UnnoiseError(
            f"{source}: {len(missing)} of its {len(layers)} layers match nothing in this model, e.g."
            f" {', '.join(missing[:3])}: a LoRA for another model family?"
        )
    if scale == 0:
        return []
    if merge:
        with torch.no_grad():
            for module, layer in found:
                merged = module.weight.float() + scale * layer.delta().reshape(module.weight.shape)
                module.weight.copy_(merged.to(module.weight.dtype))
        return []
    return [module.register_forward_hook(LoraHook(module, layer, scale)) for module, layer in found]


def parse_lora_argument(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); the scale defaults to 1."""
    path, sep, scale = text.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", scale.strip()):
        return path, float(scale)
    return text, 1.0


# --- AUTOMATIC1111's prompt syntax: <lora:NAME:WEIGHT> over a folder of LoRA files ---------------------

PROMPT_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?(?::[^>]*)?>")
SAFE_NAME = re.compile(r"[\w][\w .()+,'-]*")  # a file's stem: no separators, no "..", no drive


def prompt_loras(prompt: str) -> list[tuple[str, float]]:
    """The (name, weight) of each `<lora:NAME:WEIGHT>` in a prompt (weight 1 when left out)."""
    tags = []
    for name, weight in PROMPT_TAG.findall(prompt):
        try:
            value = 1.0 if not weight.strip() else float(weight)
        except ValueError:
            raise UnnoiseError(f"<lora:{name}:{weight}>: the weight must be a number") from None
        tags.append((name.strip(), value))
    return tags


def without_lora_tags(prompt: str) -> str:
    """The prompt the text encoder reads: the tags taken out, as AUTOMATIC1111 does."""
    return PROMPT_TAG.sub("", prompt)


def lora_in_folder(folder: Path | None, name: str) -> Path:
    """The file `<lora:NAME>` means: NAME.safetensors directly inside `folder`, nowhere else."""
    if folder is None:
        raise UnnoiseError(
            f"the prompt names a LoRA (<lora:{name}:...>) but no LoRA folder was given (`unnoise serve"
            " --lora-dir DIR`; on the command line, --lora PATH[:SCALE])"
        )
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise UnnoiseError(
            f"<lora:{name}>: a LoRA is named by its file name in the LoRA folder, nothing else"
        )
    path = Path(folder) / f"{name}.safetensors"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in Path(folder).glob("*.safetensors"))) or "none"
        raise UnnoiseError(f"no LoRA {name!r} in the LoRA folder (it has: {known})")
    return path


def loras_in_folder(folder: Path | None) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors")) if folder is not None and Path(folder).is_dir() else []
