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
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_half_life: float = 50_000.0  # in training images; the EMA forgets half its past after this many
    ema_warmup: float = 0.1  # half-life is at most this fraction of the images seen so far
    loss_weighting: Literal["native", "min_snr"] = "native"
    min_snr_gamma: float = 5.0
    precision: Literal["fp32", "bf16"] = "bf16"
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
        positive = ("steps", "batch_size", "grad_accumulation", "max_tokens", "keep_checkpoints", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise UnnoiseError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.data_workers < 0:
            raise UnnoiseError(f"--data-workers must be 0 or more, got {self.data_workers}")
        if not 0 <= self.cond_dropout < 1:
            raise UnnoiseError(f"--cond-dropout must be in [0, 1), got {self.cond_dropout}")
        if self.lr <= 0:
            raise UnnoiseError(f"--lr must be positive, got {self.lr}")
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
        return cls.from_dict(json.loads(Path(path).read_text()))
