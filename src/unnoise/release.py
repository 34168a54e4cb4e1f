"""Released weights: a folder with `model-<checksum>.safetensors` and `config.json`, loadable without
training code (releases before issue 31 have `model.safetensors`; both are read).

The config names its weights file and holds the network shape, the formulation, the text encoder and the
SHA-256 of the weights, so a half-written or modified pair is detected, and one rename of config.json
switches a release to new weights. Nothing here ever unpickles a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .diffusion.formulations import FORMULATIONS
from .errors import UnnoiseError
from .settings import DEFAULT_GUIDANCE, MAX_GUIDANCE
from .text.encoders import TOKEN_LAYERS, is_packaged_encoder

if TYPE_CHECKING:
    from .nn.presets import NetworkConfig

MODELS_DIR = Path(__file__).resolve().parent / "models"  # models shipped inside the package
RELEASE_FORMAT = "unnoise-model/1"
AUTOENCODER_FORMAT = "unnoise-autoencoder/1"  # an image codec's release (train/autoencoder.py, codec.py)
CODEC_FOLDER = "autoencoder"  # where a latent model's release keeps its codec's
# What a release's config.json may hold under "defaults": the sampling settings its maker measured best,
# used when a caller gives none (`unnoise defaults` shows and sets them; releases without keep the global)
RELEASE_DEFAULTS = ("guidance", "bind_attributes")


class CorruptCheckpointError(UnnoiseError):
    """A checkpoint file is missing, truncated or does not match its checksum."""


class WriteFailedError(OSError):
    """A checkpoint or release could not be written (a full disk, a lost mount); what was there is kept, and
    nothing half-written is left in its place. An OSError: the CLI prints its message on one line."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256(path), remembered by path, size and modification time in the user's cache (as AUTOMATIC1111
    keeps its cache.json): a Stable Diffusion model's gigabytes are hashed once, not at every load."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    store = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unnoise" / "hashes.json"
    try:
        known = json.loads(store.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), str) and len(known[key]) == 64:
        return known[key]
    digest = known[key] = sha256(path)
    try:  # a cache that cannot be written only costs the next load the hashing
        store.parent.mkdir(parents=True, exist_ok=True)
        temporary = store.with_name(f".hashes-{os.getpid()}.json")
        temporary.write_text(json.dumps(known))
        temporary.replace(store)
    except OSError:
        pass
    return digest


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
    """Write a safetensors file and flush it to disk; on failure the partial file is deleted."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        fsync_file(path)
    except (SafetensorError, OSError) as error:  # safetensors has its own error type, for a full disk too
        Path(path).unlink(missing_ok=True)
        raise WriteFailedError(write_failure(error)) from error


def write_failure(error: Exception) -> str:
    """Why a write failed, in the system's words ("No space left on device") or safetensors'."""
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def load_tensors(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} is missing")
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        raise CorruptCheckpointError(f"{path} does not match its checksum (truncated or modified)")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def release_config(
    folder: Path,
    network: NetworkConfig,
    *,
    formulation: str,
    text_encoder: str,
    text_fingerprint: str,
    max_tokens: int,
    token_layers: str,
    steps: int,
    images_seen: int,
    defaults: dict | None = None,
    codec: dict | None = None,
    resolution: int | None = None,
) -> dict:
    """The config.json of a release to be written in `folder`: what `unnoise.load` needs to rebuild the
    denoiser and its text encoder, and how far training had come (`save_release` adds the weights' checksum).

    text_encoder: "minilm" or the encoder's folder (saved relative to the release folder); text_fingerprint:
    the loaded encoder's name, which changes with its weights' files and settings. defaults: sampling
    defaults that belong to how the model was trained (RELEASE_DEFAULTS). codec: {"kind": "autoencoder",
    "folder": CODEC_FOLDER} for a latent model, whose images' side `resolution` is the network's times the
    codec's factor."""
    config = {
        "format": RELEASE_FORMAT,
        "unnoise_version": __version__,
        "network": network.to_dict(),
        "formulation": formulation,
        "text_encoder": {
            "name": text_encoder_reference(text_encoder, folder),
            "fingerprint": text_fingerprint,
            "max_tokens": max_tokens,
            "token_layers": token_layers,
        },
        "resolution": resolution or network.resolution,
        "training": {"steps": steps, "images_seen": images_seen},
    }
    if codec:
        config["codec"] = dict(codec)
    if defaults:
        config["defaults"] = dict(defaults)
    return config


def released_steps(folder: Path) -> int | None:
    """The training step a release was written at; None if it is missing, damaged or says none."""
    try:
        steps = json.loads((Path(folder) / "config.json").read_text())["training"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


# model-<checksum>.safetensors; releases written before issue 31 have model.safetensors
WEIGHTS_NAME = re.compile(r"model(-[0-9a-f]{12})?\.safetensors")


def weights_path(folder: Path, config: dict) -> Path:
    """The weights file a release's config names (`weights_file`; model.safetensors before issue 31)."""
    name = config.get("weights_file", "model.safetensors")
    if not isinstance(name, str) or not WEIGHTS_NAME.fullmatch(name):
        raise CorruptCheckpointError(
            f"{folder}: config.json: weights_file must be model.safetensors or model-<12 hex>.safetensors,"
            f" got {reprlib.repr(name)}"
        )
    return Path(folder) / name


def save_release(folder: Path, network: torch.nn.Module, config: dict, *, dtype=torch.float16) -> Path:
    """model-<checksum>.safetensors (in `dtype`) + config.json, which names that file and its checksum.

    The weights go to a file named by their checksum, so they never replace the file the current config
    names; the config is written to a temporary and renamed over config.json, the one rename that switches
    the release: a failed write (WriteFailedError) or a kill at any point leaves a release that loads, the
    old one or the new one. Afterwards weights no config names are removed, but for the previous release's
    (a reader may be loading it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp_weights = folder / f".tmp-model-{os.getpid()}.safetensors"
    tmp_config = folder / f".tmp-config-{os.getpid()}.json"
    try:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in network.state_dict().items()}
        save_tensors(state, tmp_weights)
        digest = sha256(tmp_weights)
        weights = f"model-{digest[:12]}.safetensors"
        config = {
            **config,
            "weights_file": weights,
            "weights_sha256": digest,
            "weights_dtype": str(dtype).removeprefix("torch."),
        }
        tmp_config.write_text(json.dumps(config, indent=2))
        fsync_file(tmp_config)
        previous = previous_weights(folder)
        os.replace(tmp_weights, folder / weights)
        fsync_dir(folder)
        os.replace(tmp_config, folder / "config.json")  # the switch
        fsync_dir(folder)
    except OSError as error:
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
        raise WriteFailedError(
            f"could not write the release in {folder} ({write_failure(error)}); the previous one is kept"
        ) from error
    for stale in folder.iterdir():
        if WEIGHTS_NAME.fullmatch(stale.name) and stale.name not in (weights, previous):
            stale.unlink(missing_ok=True)
    return folder


def previous_weights(folder: Path) -> str | None:
    """The weights file name the release in `folder` names now (None if it has none that is readable)."""
    try:
        return weights_path(folder, read_release_config(folder)).name
    except (UnnoiseError, OSError):
        return None


def read_release_config(folder: Path) -> dict:
    """A release folder's config.json, which must be a JSON object."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UnnoiseError(f"{folder} is not a model folder: {config_path.name} is missing") from None
    except ValueError as error:
        raise CorruptCheckpointError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{config_path} holds a {type(config).__name__}, not a model's config")
    return config


def check_release_config(folder: Path, config: dict) -> None:
    """UnnoiseError naming the field unless the config's formulation and text encoder can be used as they
    are (the network is checked against the weights in `load_network`)."""

    def refuse(field: str, wanted: str, value) -> UnnoiseError:
        return UnnoiseError(f"{folder}: config.json: {field} must be {wanted}, got {reprlib.repr(value)}")

    formulation = config.get("formulation")
    if not isinstance(formulation, str) or formulation not in FORMULATIONS:
        raise refuse("formulation", f"one of {', '.join(FORMULATIONS)}", formulation)
    encoder = config.get("text_encoder")
    if not isinstance(encoder, dict):
        raise refuse("text_encoder", "an object with name and max_tokens", encoder)
    name, max_tokens = encoder.get("name"), encoder.get("max_tokens")
    if not isinstance(name, str) or not name:
        raise refuse("text_encoder.name", "a non-empty string", name)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 2:
        raise refuse("text_encoder.max_tokens", "a whole number of at least 2", max_tokens)
    token_layers = encoder.get("token_layers", "last")  # releases before issue 11 have none: the last layer
    if not isinstance(token_layers, str) or token_layers not in TOKEN_LAYERS:
        raise refuse("text_encoder.token_layers", f"one of {', '.join(TOKEN_LAYERS)}", token_layers)
    defaults = config.get("defaults", {})
    if not isinstance(defaults, dict):
        raise refuse("defaults", 'an object such as {"guidance": 1.5}', defaults)
    unknown = sorted(set(defaults) - set(RELEASE_DEFAULTS))
    if unknown:
        raise refuse("defaults", f"an object of {', '.join(RELEASE_DEFAULTS)} only", unknown)
    if "guidance" in defaults and not is_guidance(defaults["guidance"]):
        raise refuse("defaults.guidance", f"a number in 0..{MAX_GUIDANCE:g}", defaults["guidance"])
    if not isinstance(defaults.get("bind_attributes", False), bool):
        raise refuse("defaults.bind_attributes", "true or false", defaults["bind_attributes"])


def is_guidance(value) -> bool:
    """Whether `value` is a guidance scale a release may carry: a number in 0..MAX_GUIDANCE."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and 0 <= value <= MAX_GUIDANCE  # NaN fails the comparison


def release_guidance(config: dict) -> float:
    """The guidance a checked release config recommends (its "defaults"), else DEFAULT_GUIDANCE."""
    return float(config.get("defaults", {}).get("guidance", DEFAULT_GUIDANCE))


def release_bind_attributes(config: dict) -> bool:
    """Whether a checked release config binds attributes by default (a model trained with them bound)."""
    return config.get("defaults", {}).get("bind_attributes", False)


STALE_TEMPORARY = re.compile(r"\.tmp-(?:model|config)-(\d+)\.(?:safetensors|json)")  # save_release's, ours


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporaries a killed `save_release` or `unnoise defaults` left in a release folder: those
    whose writer (the PID in the name) is gone. A live writer's are its own business."""
    removed = 0
    for path in Path(folder).glob(".tmp-*"):
        match = STALE_TEMPORARY.fullmatch(path.name)
        if match and not process_alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: never guess, keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def set_release_defaults(folder: Path, **changes: float | bool | None) -> dict:
    """Write some of a release's defaults (`guidance=1.5`, `bind_attributes=True`; None removes one) and
    return its config. Only config.json changes, through a temporary file renamed into place; the weights
    and their checksum stay."""
    folder = Path(folder)
    config = read_release_config(folder)
    check_release_config(folder, config)
    remove_stale_temporaries(folder)
    defaults = {**config.get("defaults", {}), **changes}
    defaults = {name: value for name, value in defaults.items() if value is not None}
    config = {key: value for key, value in config.items() if key != "defaults"}
    if defaults:
        config["defaults"] = defaults
    check_release_config(folder, config)
    tmp = folder / f".tmp-config-{os.getpid()}.json"
    try:
        tmp.write_text(json.dumps(config, indent=2))
        fsync_file(tmp)
        os.replace(tmp, folder / "config.json")
        fsync_dir(folder)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise WriteFailedError(
            f"could not write {folder / 'config.json'} ({write_failure(error)}); it is kept as it was"
        ) from error
    return config


def text_encoder_reference(encoder: str, release_folder: Path) -> str:
    """How config.json names a release's text encoder: the packaged one by name, a folder by its path
    relative to the release folder, so that a release and its encoder may move together (issue 13)."""
    if is_packaged_encoder(encoder):
        return encoder
    return os.path.relpath(Path(encoder).expanduser().resolve(), Path(release_folder).resolve())


def locate_text_encoder(folder: Path, name: str) -> str:
    """The text encoder config.json names, as a name or an absolute path: a relative path is relative to
    the release folder; releases written before issue 13 held one relative to where training ran, which is
    tried when the release's own does not exist."""
    path = Path(name).expanduser()
    if is_packaged_encoder(name) or path.is_absolute():
        return name
    beside_release = (Path(folder) / path).resolve()
    if beside_release.exists() or not path.exists():
        return str(beside_release)
    return str(path.resolve())  # a release from before issue 13, loaded from where it was trained


def load_release(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(float32 state dict, config) of a release folder, checked against the checksum in its config."""
    config = read_release_config(folder)
    return release_weights(folder, config), config


def release_weights(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """The release's weights as float32, checked against the checksum in its config."""
    tensors = load_tensors(weights_path(folder, config), config.get("weights_sha256"))
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file, from its header alone (nothing is read or made)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing") from None
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def resolve_model(name_or_path: str | Path) -> Path:
    """A release folder (or a diffusers Stable Diffusion folder): a path as given, or the name of a model
    shipped in the package."""
    path = Path(name_or_path)
    if is_model_folder(path):
        return path
    if path.is_file() and path.suffix == ".safetensors":  # a single-file Stable Diffusion checkpoint
        return path
    if path.is_file() and path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise UnnoiseError(
            f"{path}: a pickled checkpoint, which unnoise never loads (a pickle can run code). Convert it"
            " once where you trust the file, to .safetensors (for example with diffusers:"
            " StableDiffusionPipeline.from_single_file(...).save_pretrained(folder, safe_serialization=True))"
        )
    shipped = MODELS_DIR / str(name_or_path)
    if (shipped / "config.json").is_file():
        return shipped
    available = [p.name for p in shipped_models()]
    raise UnnoiseError(
        f"no model {str(name_or_path)!r}: not a folder with config.json (unnoise's) or model_index.json"
        " (a diffusers Stable Diffusion folder), nor a .safetensors checkpoint, nor a shipped model"
        f" (shipped: {', '.join(available) or 'none yet'})"
    )


def shipped_models() -> list[Path]:
    """The release folders shipped inside the package, by name."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())


def model_catalogue(folders: Iterable[Path] = ()) -> dict[str, Path]:
    """Released models a server may switch between, by name: the shipped ones, then the releases in each
    of `folders` (a release folder itself, or a folder of releases one level down; a run folder's `model/`
    counts under the run's name). The first model of a name wins."""
    catalogue = {p.name: p for p in shipped_models()}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UnnoiseError(f"--models-dir {str(folder)!r} is not a folder")
        candidates = [folder] if is_model_folder(folder) else sorted(folder.iterdir())
        for candidate in candidates:
            release = candidate / "model" if (candidate / "model" / "config.json").is_file() else candidate
            if is_model_folder(release):
                catalogue.setdefault(model_name(release), release)
    return catalogue


def is_model_folder(folder: Path) -> bool:
    """An unnoise release (config.json) or a diffusers Stable Diffusion folder (model_index.json)."""
    return (folder / "config.json").is_file() or (folder / "model_index.json").is_file()


def model_name(folder: Path) -> str:
    """A release's name: its folder's, or for a training run's `model/` the run's."""
    folder = Path(folder).resolve()
    return folder.parent.name if folder.name == "model" and folder.parent.name else folder.name


def model_hash(config: dict) -> str:
    """AUTOMATIC1111's short model hash: the first 10 hex digits of the weights' SHA-256 ('' if unknown)."""
    return str(config.get("weights_sha256", ""))[:10]


def load_network(folder: Path) -> tuple[torch.nn.Module, dict]:
    """(network with the release's weights, the release's config); a mismatch is a clear error.

    Every field `unnoise.load` reads is checked first (`check_release_config`), and the text encoder's path
    in the config returned is absolute (`locate_text_encoder`). The network is checked before anything is
    allocated: it is built on the meta device (no memory) and its tensor shapes compared with the
    safetensors header, so a config that asks for a huge network next to small weights is refused at once;
    only then are the weights read and checked."""
    from .nn.presets import network_config_from_dict

    folder = Path(folder)
    config = read_release_config(folder)
    check_release_config(folder, config)
    encoder = config["text_encoder"]
    config = {**config, "text_encoder": {**encoder, "name": locate_text_encoder(folder, encoder["name"])}}
    try:  # "network" since issue 11; earlier releases hold a UNet's shape under "unet"
        network_config = network_config_from_dict(config.get("network") or config["unet"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise UnnoiseError(f"{folder}: config.json does not describe a network ({error})") from None
    return materialise(folder, network_config, config), config


def materialise(folder: Path, network_config, config: dict) -> torch.nn.Module:
    """The network `network_config` builds, with the weights of `folder`/model.safetensors: built on the
    meta device first and its shapes compared with the safetensors header, so a config that asks for more
    than its weights hold is refused before anything is allocated."""
    try:
        with torch.device("meta"):
            network = network_config.build()
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise UnnoiseError(f"{folder}: config.json does not describe a network ({error})") from None
    expected = {name: tuple(t.shape) for name, t in network.state_dict().items()}
    found = tensor_shapes(weights_path(folder, config))
    if expected != found:
        name = next(n for n in sorted({*expected, *found}) if expected.get(n) != found.get(n))
        raise UnnoiseError(
            f"{folder}: the weights do not match config.json ({name}: the config makes"
            f" {expected.get(name, 'nothing')}, the weights hold {found.get(name, 'nothing')})"
        )
    network = network.to_empty(device="cpu")
    network.load_state_dict(release_weights(folder, config))
    return network
