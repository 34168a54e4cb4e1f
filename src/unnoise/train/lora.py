"""LoRA training (Hu et al. 2021): low-rank adapters on a frozen network's attention projections.

Each adapted projection W (the q, kv and out layers of every self- and cross-attention) computes
W x + (alpha / r) * B (A x), with A (r, in) initialised as nn.Linear's weights are and B (out, r) at zero,
so training starts from the base model exactly; only A and B train. The adapters live on the layers
themselves (parameters `lora_down` = A and `lora_up` = B, a forward hook), so the EMA copy, checkpoints
and resume carry them like any weight. The release is the adapters alone, in the diffusers / PEFT layout
(`unet.<layer>.lora_A.weight`, `lora_B`, `lora_alpha` in the metadata) that `unnoise generate --lora`
(unnoise/lora.py) and PEFT-layout readers load.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UnnoiseError

TARGETS = re.compile(r"(self_attention|cross_attention|attentions\.\d+)\.(q|kv|out)$")
LORA_FILE = "lora.safetensors"


def lora_forward(module: nn.Linear, inputs, output: torch.Tensor) -> torch.Tensor:
    """W x + (alpha / r) B (A x): the hook every adapted layer carries."""
    x = inputs[0]
    return output + module.lora_scale * F.linear(F.linear(x, module.lora_down), module.lora_up)


def add_adapters(network: nn.Module, rank: int, alpha: float) -> list[str]:
    """Freeze `network` and give each attention projection an adapter of rank `rank`; their names."""
    network.requires_grad_(False)
    names = []
    for name, module in network.named_modules():
        if not (type(module) is nn.Linear and TARGETS.search(name)):
            continue
        down = torch.empty(rank, module.in_features, device=module.weight.device)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as nn.Linear initialises its weight
        module.lora_down = nn.Parameter(down)
        module.lora_up = nn.Parameter(torch.zeros(module.out_features, rank, device=module.weight.device))
        module.lora_scale = alpha / rank
        module.register_forward_hook(lora_forward)
        names.append(name)
    if not names:
        raise UnnoiseError("--lora-rank: this network has no attention layers to adapt")
    return names


def adapter_count(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def save_lora(folder: Path, network: nn.Module, names: list[str], alpha: float, base: dict) -> Path:
    """`folder`/lora.safetensors (float32 adapters, PEFT layout) and config.json naming the base model."""
    from safetensors.torch import save_file

    from ..release import fsync_dir, fsync_file, sha256

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = dict(network.named_modules())
    tensors = {}
    for name in names:
        tensors[f"unet.{name}.lora_A.weight"] = modules[name].lora_down.detach().float().cpu().contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = modules[name].lora_up.detach().float().cpu().contiguous()
    metadata = {"lora_alpha": json.dumps(alpha), "base_model": json.dumps(base)}
    temporary = folder / f".tmp-{LORA_FILE}"
    save_file(tensors, str(temporary), metadata=metadata)
    fsync_file(temporary)
    temporary.replace(folder / LORA_FILE)  # one rename: the file is whole or the previous one
    config = {"format": "unnoise-lora/1", "lora_file": LORA_FILE, "lora_sha256": sha256(folder / LORA_FILE),
              "rank": int(tensors[next(iter(tensors))].shape[0]), "alpha": alpha, "base": base}  # fmt: skip
    temporary = folder / ".tmp-config.json"
    temporary.write_text(json.dumps(config, indent=2))
    fsync_file(temporary)
    temporary.replace(folder / "config.json")
    fsync_dir(folder)
    return folder / LORA_FILE
