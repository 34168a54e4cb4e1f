"""Training configuration: one flat dataclass; CLI flags map to its fields; the resolved copy is saved."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import UnnoiseError

if TYPE_CHECKING:
    from ..data.shapes import GroundedWords


def option(default, help: str):
    """A config field with its help text, which `unnoise train --help` shows."""
    return field(default=default, metadata={"help": help})


class RunConfig:
    """What a training run's config (a dataclass) shares: its config.json and back."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise UnnoiseError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**values)

    @classmethod
    def read_file(cls, path: str | Path) -> dict:
        """The options of a `--config` file: TOML (`lr = 5e-4`) or JSON, names with _ or -; every name
        must be an option of this command and every value of its type (checked when the config is made)."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise UnnoiseError(f"--config {path}: cannot read it ({error.strerror})") from None
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            else:
                import tomllib

                values = tomllib.loads(text)
        except ImportError:
            raise UnnoiseError(
                f"--config {path}: TOML needs Python 3.11 or later; give a .json file"
            ) from None
        except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
            kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
            raise UnnoiseError(f"--config {path}: not valid {kind} ({error})") from None
        if not isinstance(values, dict):
            raise UnnoiseError(f"--config {path}: a table of options was expected")
        values = {str(name).replace("-", "_"): value for name, value in values.items()}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise UnnoiseError(f"--config {path}: unknown options {', '.join(unknown)}")
        for name, value in values.items():
            problem = option_type_problem(cls, name, value)
            if problem:
                raise UnnoiseError(f"--config {path}: {name} {problem}")
        return values

    @classmethod
    def load(cls, path: Path):
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


def option_type_problem(config_class, name: str, value) -> str:
    """What is wrong with `value` for option `name` ('' if nothing), as the option's flag would check it:
    one of a Literal's choices, or a value of the default's type (a whole number where a float is)."""
    import typing

    hint = typing.get_type_hints(config_class)[name]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return "" if value in choices else f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    kinds = tuple(t for t in typing.get_args(hint) if t is not type(None)) or (hint,)
    if value is None and type(None) in typing.get_args(hint):
        return ""
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return ""
    if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
        return ""
    wanted = " or ".join(k.__name__ for k in kinds)
    return f"must be {wanted}, got {value!r}"


@dataclass
class TrainConfig(RunConfig):
    # what to learn
    data: str = option("shapes", "'shapes' (built in, procedural, unbounded) or a folder of captioned images")
    preset: str = option(
        "small",
        "network: tiny, small (the UNet of shapes-32), small-pos (with 2-D positions and a text refiner),"
        " small-p2 (a UNet on 2x2-folded pixels), small-p2q (with positions in its cross-attention queries),"
        " dit-small (a transformer), dit-p4 (one on 4x4 patches), dit-tiny, large (64x64), pixel-64 (64x64"
        " folded 4x4), latent-small and latent-tiny (with --autoencoder); see docs/training.md",
    )
    formulation: str = option("edm", "edm, vp, vp-cosine, ddpm, ddpm-cosine, ve or flow (see docs/math.md)")
    text_encoder: str = option(
        "minilm", "'minilm' (the packaged all-MiniLM-L6-v2) or a local Hugging Face encoder folder"
    )
    max_tokens: int = option(32, "caption tokens kept, special tokens included")
    text_token_layers: Literal["last", "first-last"] = option(
        "last",
        "what cross-attention reads: the encoder's last layer, or the mean of its first and last (the first"
        " keeps words apart that MiniLM's last nearly merges, such as left and right; see docs/training.md)",
    )
    resolution: int | None = option(
        None,
        "image side in pixels (default: a folder's image size when its images agree, else the preset's; a"
        " latent model's: its autoencoder's)",
    )
    autoencoder: str = option(
        "",
        "an autoencoder release (train-autoencoder's model/): the network learns the folder's latents instead"
        " of its pixels, and the release carries the autoencoder (presets latent-small, latent-tiny)",
    )
    held_out: float = option(
        0.0,
        "fraction of a folder's concepts kept out of training (data/split.py, seed 0), for `unnoise eval"
        " folder` to measure generalisation on",
    )
    background: str = option("#ffffff", "colour behind transparent pixels of a folder's images")
    caption_column: str = option("text", "the caption column of a folder's metadata.jsonl or .csv")
    shapes_mix: str = option(
        "",
        "the built-in shapes' caption mix: scene-kind weights and single-object caption probabilities,"
        " e.g. 'single=0.6,relation=0.2,count=0.1,binding=0.1,position=0.9' (unnamed ones keep the"
        " default: single=0.3,relation=0.25,count=0.25,binding=0.2,position=0.7,size=0.5)",
    )
    init_from: str = option(
        "",
        "fine-tune: start from this model's weights (a shipped name or a release folder), keeping its"
        " network, formulation, text encoder, autoencoder and size (--preset, --formulation, --text-encoder,"
        " --autoencoder and --resolution then come from it); the release names it as its parent",
    )
    lora_rank: int = option(
        0,
        "with --init-from: train only low-rank adapters of this rank on the attention layers, the model"
        " frozen; the release is model/lora.safetensors, for `generate --lora` (0: train every weight)",
    )
    lora_alpha: float | None = option(None, "the adapters' alpha: their update is scaled by alpha / rank")
    regularization: str = option(
        "",
        "'shapes' or a folder of captioned images mixed into every batch (kohya's regularization images,"
        " DreamBooth's prior preservation), so that fine-tuning keeps what the model knew: give the data it"
        " learned from",
    )
    regularization_fraction: float = option(0.5, "the share of each batch drawn from --regularization")
    flip: bool = option(False, "random horizontal flips (off for shapes: captions name left and right)")
    cond_dropout: float = option(0.1, "fraction of captions replaced by '' so classifier-free guidance works")

    # how long and how fast
    steps: int = option(10_000, "optimizer steps in all (a resumed run stops there too)")
    batch_size: int = option(64, "images per step, over all processes and accumulation steps")
    grad_accumulation: int = option(1, "micro-batches per step")
    lr: float = option(2e-4, "AdamW's peak learning rate")
    warmup_steps: int = option(500, "steps of linear warm-up to --lr")
    lr_schedule: Literal["constant", "linear", "cosine"] = option(
        "constant",
        "after the warm-up: constant (with the --lr-decay-fraction tail), or down to 0 at the last step,"
        " linearly or along a half cosine",
    )
    lr_decay_fraction: float = option(
        0.0, "constant schedule: the last fraction of the steps decays the learning rate linearly to 0"
    )
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay")
    grad_clip: float = option(1.0, "the gradient's norm is clipped to this")
    ema_half_life: float = option(
        50_000.0, "EMA half-life in training images: the EMA forgets half its past after this many"
    )
    ema_warmup: float = option(0.1, "the half-life is at most this fraction of the images seen so far")
    loss_weighting: Literal["native", "min_snr"] = option(
        "native", "the formulation's own loss weight, or min-SNR-gamma (Hang et al. 2023)"
    )
    sigma_p_mean: float | None = option(
        None,
        "EDM's training density of log sigma is N(mean, std^2), default -1.2; a higher mean trains more"
        " at the noise levels where the layout is decided",
    )
    sigma_p_std: float | None = option(None, "the std of that density, default 1.2")
    min_snr_gamma: float = option(5.0, "min-SNR's gamma")
    grounding_weight: float = option(
        0.0,
        "weight of a loss that teaches cross-attention which pixels each colour and shape word names"
        " (built-in shapes only, which know where they are; after TokenCompose, see train/grounding.py);"
        " 0: off",
    )
    ground_places: bool = option(
        False,
        "with --grounding-weight, ground the words of place too: a single object's stated position"
        " ('top', 'left') and a relation's word ('left', 'above') in the pixels of the object they place",
    )
    ground_numbers: bool = option(
        False,
        "with --grounding-weight, ground a count's number word too ('three' of 'three red circles') in the"
        " pixels of every object it counts",
    )
    bind_attributes: bool = option(
        False,
        "train with each noun's cross-attention bound to its attributes' (nn.layers.bind_attention), as"
        " --bind-attributes samples; the release then binds by default",
    )
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto",
        "auto: bf16 autocast where the hardware multiplies bf16 natively (CUDA, a CPU with AVX-512 BF16 or"
        " AMX), else fp32 (bf16 without them is emulated: training 13x slower on an AVX2 CPU)",
    )
    compile: bool = option(False, "torch.compile the network")
    device: str = option("auto", "auto (cuda when there is a GPU, else cpu), cpu, cuda, cuda:1, ...")
    data_workers: int = option(0, "processes that make batches ahead of the model (0: the training process)")
    seed: int = option(0, "seeds the data, the noise and the initial weights")

    # what to write
    out: str = option("runs/shapes", "the run's folder: model/, state-*/, log.csv, samples/, config.json")
    log_every: int = option(50, "steps between rows of log.csv")
    tensorboard: bool = option(
        False,
        "also log to OUT/tensorboard (losses, learning rate, grad norm, images/s, sample grids, validation"
        ' loss) for `tensorboard --logdir OUT`; needs pip install "unnoise[tensorboard]"',
    )
    sample_prompts: str = option(
        "", "a text file of prompts, one per line (up to 16), for the sample grids (seed i for prompt i)"
    )
    sample_every: int = option(1000, "steps between sample grids in samples/ (0: none)")
    checkpoint_every: int = option(500, "steps between resumable checkpoints and releases")
    checkpoint_minutes: float = option(
        10.0, "also a checkpoint when this many minutes of training passed since the last (0: by steps only)"
    )
    keep_checkpoints: int = option(3, "the newest this many checkpoints are kept")
    max_bad_steps: int = option(20, "this many non-finite losses in a row stop the run")

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
        for name in ("data_workers", "warmup_steps", "sample_every", "seed", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise UnnoiseError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "ema_half_life", "ema_warmup", "min_snr_gamma"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):
                raise UnnoiseError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.text_token_layers not in ("last", "first-last"):
            raise UnnoiseError(
                f"--text-token-layers must be 'last' or 'first-last', got {self.text_token_layers!r}"
            )
        if self.shapes_mix:
            from ..data.shapes import CaptionMix

            if self.data != "shapes":
                raise UnnoiseError("--shapes-mix is for the built-in data set (--data shapes)")
            CaptionMix.parse(self.shapes_mix)
        if self.resolution is not None and not 16 <= self.resolution <= 1024:
            raise UnnoiseError(f"--resolution must be in 16..1024 pixels, got {self.resolution}")
        if self.autoencoder and self.data == "shapes":
            raise UnnoiseError("--autoencoder trains on a folder's images: give --data FOLDER")
        if self.regularization and not 0 < self.regularization_fraction < 1:
            raise UnnoiseError(
                f"--regularization-fraction must be in (0, 1), got {self.regularization_fraction}"
            )
        if self.regularization not in ("", "shapes") and not Path(self.regularization).is_dir():
            raise UnnoiseError(f"--regularization {self.regularization!r}: no such folder (or 'shapes')")
        if self.regularization and self.autoencoder:
            raise UnnoiseError("--regularization mixes pixel images: not yet for a latent model")
        if self.sample_prompts:
            self.prompts()  # a missing or empty file is named before anything loads
        if self.lora_rank < 0 or (self.lora_rank and not self.init_from):
            raise UnnoiseError("--lora-rank adapts a model: give --init-from MODEL (and a rank of 1 or more)")
        if self.lora_alpha is not None and not 0 < self.lora_alpha < float("inf"):
            raise UnnoiseError(f"--lora-alpha must be a positive number, got {self.lora_alpha}")
        if not 0 <= self.held_out < 1:
            raise UnnoiseError(f"--held-out must be in [0, 1), got {self.held_out}")
        if self.held_out and self.data == "shapes":
            raise UnnoiseError("--held-out splits a folder's concepts; the built-in shapes are unbounded")
        if not 0 <= self.cond_dropout < 1:
            raise UnnoiseError(f"--cond-dropout must be in [0, 1), got {self.cond_dropout}")
        if not self.lr > 0 or self.lr == float("inf"):
            raise UnnoiseError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise UnnoiseError(f"--lr-decay-fraction must be in [0, 1], got {self.lr_decay_fraction}")
        if self.lr_schedule != "constant" and self.lr_decay_fraction:
            raise UnnoiseError(
                f"--lr-decay-fraction is the constant schedule's tail; the {self.lr_schedule} schedule decays"
                " over all the steps after the warm-up: give one or the other"
            )
        if self.sigma_p_mean is not None and not abs(self.sigma_p_mean) < float("inf"):
            raise UnnoiseError(f"--sigma-p-mean must be a finite number, got {self.sigma_p_mean}")
        if not 0 <= self.grounding_weight < float("inf"):
            raise UnnoiseError(f"--grounding-weight must be a number >= 0, got {self.grounding_weight}")
        if self.grounding_weight and self.data != "shapes":
            raise UnnoiseError(
                "--grounding-weight needs to know where each word is in the image: only the built-in shapes"
                " (--data shapes) do"
            )
        for flag, on in (("--ground-places", self.ground_places), ("--ground-numbers", self.ground_numbers)):
            if on and not self.grounding_weight:
                raise UnnoiseError(f"{flag} grounds words with the grounding loss: give --grounding-weight")
        if self.grounding_weight and self.compile:
            raise UnnoiseError("--grounding-weight reads the attention through hooks, which --compile drops")
        if self.bind_attributes and self.compile:
            raise UnnoiseError(
                "--bind-attributes changes the attention per caption, which --compile cannot follow"
            )
        if self.sigma_p_std is not None and not 0 < self.sigma_p_std < float("inf"):
            raise UnnoiseError(f"--sigma-p-std must be positive, got {self.sigma_p_std}")
        return self

    def prompts(self) -> list[str]:
        """The --sample-prompts file's prompts (at most 16)."""
        try:
            lines = Path(self.sample_prompts).read_text(errors="replace").splitlines()
        except OSError as error:
            raise UnnoiseError(f"--sample-prompts {self.sample_prompts}: cannot read it ({error})") from None
        prompts = [line.strip() for line in lines if line.strip()][:16]
        if not prompts:
            raise UnnoiseError(f"--sample-prompts {self.sample_prompts}: no prompt in it")
        return prompts

    def grounded_words(self) -> GroundedWords | None:
        """The words the grounding loss places (None: no grounding loss)."""
        from ..data.shapes import GroundedWords

        if not self.grounding_weight:
            return None
        return GroundedWords(places=self.ground_places, numbers=self.ground_numbers)
