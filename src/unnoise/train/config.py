"""Training configuration: one flat dataclass; CLI flags map to its fields; the resolved copy is saved."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from ..errors import UnnoiseError


@dataclass
class TrainConfig:
    # what to learn
    data: str = "shapes"  # "shapes" (built in, procedural) or a folder of captioned images
    preset: str = "small"  # network shape, see unnoise.nn.presets
    formulation: str = "edm"  # see unnoise.diffusion.formulations.FORMULATIONS
    text_encoder: str = "minilm"  # "minilm" (packaged all-MiniLM-L6-v2) or a local Hugging Face folder
    max_tokens: int = 32
    resolution: int | None = None  # default: the preset's
    background: str = "#ffffff"  # colour behind transparent pixels of a folder's images
    flip: bool = False  # random horizontal flips (off for shapes: captions name left and right)
    cond_dropout: float = 0.1  # fraction of captions replaced by "" so classifier-free guidance works

    # how long and how fast
    steps: int = 10_000
    batch_size: int = 64  # global batch: split over processes, times accumulation
    grad_accumulation: int = 1
    lr: float = 2e-4
    warmup_steps: int = 500
    lr_decay_fraction: float = 0.0  # the last fraction of the steps decays the learning rate linearly to 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_half_life: float = 50_000.0  # in training images; the EMA forgets half its past after this many
    ema_warmup: float = 0.1  # half-life is at most this fraction of the images seen so far
    loss_weighting: Literal["native", "min_snr"] = "native"
    # EDM's training density of log sigma, N(p_mean, p_std^2) (default: the formulation's, -1.2 and 1.2);
    # a higher mean spends more of training at the noise levels where the layout is decided
    sigma_p_mean: float | None = None
    sigma_p_std: float | None = None
    min_snr_gamma: float = 5.0
    # auto: bf16 autocast where the hardware multiplies bf16 natively (a GPU, a CPU with AVX-512 BF16 or
    # AMX), else fp32: on a CPU without them bf16 is emulated, measured 400x slower than fp32 (AVX2 EPYC)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    device: str = "auto"
    data_workers: int = 0  # processes that make batches ahead of the model (0: the training process)
    seed: int = 0

    # what to write
    out: str = "runs/shapes"
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # this many non-finite losses in a row stop the run

    def validate(self) -> TrainConfig:
        at_least_one = (
            "steps", "batch_size", "grad_accumulation", "max_tokens", "keep_checkpoints", "log_every",
            "checkpoint_every", "max_bad_steps",
        )  # fmt: skip
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise UnnoiseError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("data_workers", "warmup_steps", "sample_every", "seed"):
            if getattr(self, name) < 0:
                raise UnnoiseError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "ema_half_life", "ema_warmup", "min_snr_gamma"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise UnnoiseError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.resolution is not None and not 16 <= self.resolution <= 1024:
            raise UnnoiseError(f"--resolution must be in 16..1024 pixels, got {self.resolution}")
        if not 0 <= self.cond_dropout < 1:
            raise UnnoiseError(f"--cond-dropout must be in [0, 1), got {self.cond_dropout}")
        if not self.lr > 0 or self.lr == float("inf"):
            raise UnnoiseError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise UnnoiseError(f"--lr-decay-fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if self.sigma_p_std is not None and not self.sigma_p_std > 0:
            raise UnnoiseError(f"--sigma-p-std must be positive, got {self.sigma_p_std}")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise UnnoiseError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """A run's saved config.json; a damaged one is named, never a traceback."""
        try:
            values = json.loads(Path(path).read_text())
        except ValueError as error:
            raise UnnoiseError(f"{path} is not valid JSON ({error}); fix or delete it to resume") from None
        if not isinstance(values, dict):
            raise UnnoiseError(f"{path} holds a {type(values).__name__}, not a training configuration")
        try:
            return cls.from_dict(values)
        except TypeError as error:
            raise UnnoiseError(f"{path} is not a training configuration ({error})") from None
