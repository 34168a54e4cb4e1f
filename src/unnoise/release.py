"""Released weights: a folder with `model.safetensors` and `config.json`, loadable without training code.

The config holds the network shape, the formulation, the text encoder and the SHA-256 of the weights, so a
half-written or modified pair is detected. Nothing here ever unpickles a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UnnoiseError


class CorruptCheckpointError(UnnoiseError):
    """A checkpoint file is missing, truncated or does not match its checksum."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_file(path)


def load_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} is missing")
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        raise CorruptCheckpointError(f"{path} does not match its checksum (truncated or modified)")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def save_release(folder: Path, network: torch.nn.Module, config: dict, *, dtype=torch.float16) -> Path:
    """model.safetensors (in `dtype`) + config.json, the weights' checksum inside the config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    tmp = folder / f".tmp-model-{os.getpid()}.safetensors"
    save_tensors(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in network.state_dict().items()}, tmp
    )
    config = {**config, "weights_sha256": sha256(tmp), "weights_dtype": str(dtype).removeprefix("torch.")}
    os.replace(tmp, weights)
    tmp_config = folder / f".tmp-config-{os.getpid()}.json"
    tmp_config.write_text(json.dumps(config, indent=2))
    fsync_file(tmp_config)
    os.replace(tmp_config, folder / "config.json")
    fsync_dir(folder)
    return folder


def load_release(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(float32 state dict, config) of a release folder, checked against the checksum in its config."""
    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UnnoiseError(f"{folder} is not a model folder: {config_path.name} is missing") from None
    except ValueError as error:
        raise CorruptCheckpointError(f"{config_path} is not valid JSON ({error})") from None
    tensors = load_tensors(folder / "model.safetensors", config.get("weights_sha256"))
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, config
