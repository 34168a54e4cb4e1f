"""Resumable training state, never unpickled (released weights live in `unnoise.release`).

A training state is a folder `state-NNNNNNNN/` with the network, its EMA and the optimizer as safetensors
and `state.json` (step, data position, config, checksums). It is written to a hidden temporary folder,
flushed, and renamed into place, so a killed process leaves either the whole state or none; on resume a
state whose checksums fail is reported and the previous one is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..release import (
    CorruptCheckpointError,
    WriteFailedError,
    fsync_dir,
    fsync_file,
    load_tensors,
    save_tensors,
    sha256,
    write_failure,
)

logger = logging.getLogger("unnoise.train")

STATE_PREFIX = "state-"
STATE_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors")


# --- optimizer state without pickle -------------------------------------------------------------------


def optimizer_to_safe(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able values."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_safe(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load optimizer state, then lay each state tensor out like its parameter (e.g. channels-last).

    safetensors stores tensors contiguous, and fused AdamW on a CPU silently computes wrong updates when a
    moment's memory layout differs from its parameter's (seen with torch 2.13).
    """
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == param.shape
                    and value.stride() != param.stride()
                ):
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# --- training state ------------------------------------------------------------------------------------


def save_training_state(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict,
    keep: int = 3,
) -> Path:
    """Write state-<step>/ atomically, then delete all but the newest `keep` states.

    A failed write (a full disk) deletes its temporary folder and raises WriteFailedError: the previous
    states are untouched, and resume never sees a half-written one."""
    run_dir = Path(run_dir)
    final = run_dir / f"{STATE_PREFIX}{step:08d}"
    tmp = run_dir / f".tmp-{STATE_PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_state_folder(tmp, step, model=model, ema=ema, optimizer=optimizer, extra=extra)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = "the previous checkpoint is kept" if list_states(run_dir) else "there is no earlier checkpoint"
        raise WriteFailedError(
            f"could not save the checkpoint of step {step} in {run_dir} ({write_failure(error)}); {kept}:"
            " free some space, then --resume"
        ) from error
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    for old in list_states(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_state_folder(
    folder: Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict,
) -> None:
    """The three safetensors files and state.json (with their checksums), flushed to disk."""
    folder.mkdir(parents=True)
    optimizer_tensors, optimizer_meta = optimizer_to_safe(optimizer.state_dict())
    files = {"model.safetensors": model.state_dict(), "ema.safetensors": ema.state_dict()}
    files["optimizer.safetensors"] = optimizer_tensors
    for name, tensors in files.items():
        save_tensors(tensors, folder / name)
    meta = {"step": step, "optimizer": optimizer_meta, "extra": extra}
    meta["sha256"] = {name: sha256(folder / name) for name in files}
    (folder / "state.json").write_text(json.dumps(meta, indent=1))
    fsync_file(folder / "state.json")
    fsync_dir(folder)


def list_states(run_dir: Path) -> list[Path]:
    """Finished state folders, newest first (half-written ones are hidden temporaries, never listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    states = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(STATE_PREFIX)]
    return sorted(states, key=lambda p: p.name, reverse=True)


def load_training_state(state_dir: Path) -> dict:
    """model, ema and optimizer state dicts, step and extra; CorruptCheckpointError if anything is off."""
    state_dir = Path(state_dir)
    try:
        meta = json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"{state_dir / 'state.json'} is missing or unreadable ({error})"
        ) from None
    check_state_meta(meta, state_dir)
    checksums = meta["sha256"]
    tensors = {name: load_tensors(state_dir / name, checksums[name]) for name in STATE_FILES}
    return {
        "step": meta["step"],
        "model": tensors["model.safetensors"],
        "ema": tensors["ema.safetensors"],
        "optimizer": optimizer_from_safe(tensors["optimizer.safetensors"], meta["optimizer"]),
        "extra": meta["extra"],
    }


def check_state_meta(meta, state_dir: Path) -> None:
    """A state.json that parses but is wrong (a key renamed, a checksum missing, the step edited) is as
    damaged as a truncated one: CorruptCheckpointError, so the previous checkpoint is used instead."""
    where = state_dir / "state.json"
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{where} holds a {type(meta).__name__}, not a checkpoint's description")
    missing = [key for key in ("step", "sha256", "optimizer", "extra") if key not in meta]
    if missing:
        raise CorruptCheckpointError(f"{where} lacks {', '.join(missing)}")
    checksums = meta["sha256"]
    if not isinstance(checksums, dict) or any(not isinstance(checksums.get(n), str) for n in STATE_FILES):
        raise CorruptCheckpointError(f"{where} does not give a checksum for each of {', '.join(STATE_FILES)}")
    if meta["step"] != state_step(state_dir):
        raise CorruptCheckpointError(
            f"{where} says step {meta['step']!r}, but its folder is {state_dir.name}"
        )


def state_step(state_dir: Path) -> int | None:
    """The step in a state folder's name (state-00001000 -> 1000), None if the name has none."""
    digits = state_dir.name.removeprefix(STATE_PREFIX)
    return int(digits) if digits.isdigit() else None


def remove_temporaries(run_dir: Path) -> int:
    """Delete the `.tmp-*` files and folders a killed or failed write left in the run and its release."""
    removed = 0
    for folder in (Path(run_dir), Path(run_dir) / "model"):
        for tmp in folder.glob(".tmp-*") if folder.is_dir() else ():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            removed += 1
    return removed


def latest_good_state(run_dir: Path, report: Callable[[str], None] = logger.warning) -> dict | None:
    """The newest training state that loads cleanly; damaged ones are reported and skipped."""
    for state_dir in list_states(run_dir):
        try:
            return load_training_state(state_dir)
        except CorruptCheckpointError as error:
            report(f"skipping damaged checkpoint: {error}")
    return None


# --- one trainer per run folder -------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run folder for as long as one training process writes there (issue 31: two
    `--resume`s on one folder both trained, and one's steps were silently lost). `flock` on `.lock`: the
    kernel drops it when the process ends, however it ends, so a killed run never leaves a stale lock."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def __enter__(self) -> RunLock:
        import fcntl

        from ..errors import UnnoiseError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise UnnoiseError(
                f"{self.path.parent} is in use by another training ({holder}): wait for it to finish or stop"
                " it, or choose another --out"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"PID {os.getpid()}")
        file.flush()
        self.file = file
        return self

    def __exit__(self, *_) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None
