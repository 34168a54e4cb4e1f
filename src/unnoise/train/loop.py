"""The training loop: one linear pass of forward, backward, EMA, log, sample and checkpoint per step."""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..codec import load_codec
from ..diffusion.denoiser import Denoiser, min_snr_weight
from ..diffusion.formulations import FORMULATIONS
from ..errors import UnnoiseError
from ..nn.presets import PRESETS
from ..nn.unet import count_parameters
from ..release import CODEC_FOLDER, WriteFailedError, release_config, released_steps, save_release
from ..settings import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from ..text.encoders import CachedTextEncoder, load_text_encoder
from ..text.phrases import attribute_phrases
from .checkpoint import (
    RunLock,
    latest_good_state,
    load_optimizer_state,
    remove_temporaries,
    save_training_state,
)
from .config import TrainConfig
from .data import Batch, LatentSource, MixedSource, make_batch, open_source
from .distributed import Distributed, barrier, init_distributed, mean_across, shutdown
from .ema import EMA, ema_decay
from .grounding import cross_attention_blocks, grounding_loss, recorded_cross_attention, token_masks
from .lora import add_adapters, save_lora
from .watch import Board, validation_loss

logger = logging.getLogger("unnoise.train")  # what the loop says: on stdout unless logging is configured

SAMPLE_PROMPTS = {
    "shapes": [
        "a red circle",
        "a large blue square in the top left",
        "a green triangle to the left of a yellow circle",
        "three purple squares",
        "a red square and a blue circle",
        "a small orange triangle at the bottom",
        "two green circles",
        "a yellow square above a red triangle",
    ]
}


class Run:
    """Everything one training process holds: model, EMA, optimizer, data and text encoder.

    `log` receives what resuming has to say (by default the `unnoise.train` logger)."""

    def __init__(self, config: TrainConfig, setup: Distributed, log: Callable[[str], None] = logger.info):
        self.parent = Parent.of(config.init_from) if config.init_from else None  # the model fine-tuned
        if self.parent is not None:
            config = self.parent.inherited(config)
        self.config, self.setup, self.log = config, setup, log
        if config.preset not in PRESETS:
            raise UnnoiseError(f"unknown preset {config.preset!r}; choose from {', '.join(PRESETS)}")
        if config.formulation not in FORMULATIONS:
            raise UnnoiseError(
                f"unknown formulation {config.formulation!r}; choose from {', '.join(FORMULATIONS)}"
            )
        per_process = config.batch_size / (setup.world_size * config.grad_accumulation)
        if per_process != int(per_process):
            raise UnnoiseError(
                f"--batch-size {config.batch_size} does not split into {setup.world_size} processes x "
                f"{config.grad_accumulation} accumulation steps"
            )
        self.micro_batch = int(per_process)
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and native_bf16(setup.device))
        self.dir = Path(config.out)
        self.codec = load_codec(config.autoencoder) if config.autoencoder else None
        self.resolution = pixel_resolution(config, self.codec, log)  # the images' side in pixels
        self.network_config = (
            network_shape(config, self.codec, self.resolution) if self.parent is None else self.parent.network
        )
        self.formulation = training_formulation(config)
        torch.manual_seed(config.seed)
        self.network = self.network_config.build().to(setup.device)
        if self.parent is not None:  # fine-tuning: its weights (the EMA starts from them too)
            self.network.load_state_dict(self.parent.weights())
        self.lora_layers = (  # LoRA: the network frozen, adapters on its attention projections
            add_adapters(self.network, config.lora_rank, config.lora_alpha or config.lora_rank)
            if config.lora_rank
            else []
        )
        for flag, asked in (
            ("--grounding-weight", config.grounding_weight),
            ("--bind-attributes", config.bind_attributes),
        ):
            if asked and not cross_attention_blocks(self.network):
                raise UnnoiseError(f"{flag}: the {config.preset} network has no cross-attention to the text")
        if setup.device.type == "cpu":
            self.network = self.network.to(memory_format=torch.channels_last)
        self.ema = EMA(self.network)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.network.parameters() if p.requires_grad],  # with LoRA, the adapters alone
            lr=config.lr,
            betas=(0.9, 0.99),
            weight_decay=config.weight_decay,
            fused=True,
        )
        self.text = CachedTextEncoder(
            load_text_encoder(
                config.text_encoder, max_tokens=config.max_tokens, token_layers=config.text_token_layers
            )
        )
        self.source = open_source(
            config.data,
            self.resolution,
            config.seed,
            config.background,
            config.caption_column,
            config.shapes_mix,
            config.held_out,
        )
        if config.regularization:  # the data the model learned from, mixed in so it keeps it
            extra = open_source(config.regularization, self.resolution, config.seed + 1, config.background,
                                config.caption_column, config.shapes_mix)  # fmt: skip
            self.source = MixedSource(self.source, extra, config.regularization_fraction, config.seed)
        if self.codec is not None:
            self.codec.to(setup.device)
            self.source = LatentSource(
                self.source, self.codec, self.dir / "latents.safetensors", flip=config.flip, log=log
            )
        if self.source.captions is not None:
            self.text.precompute([*self.source.captions, ""], progress=setup.is_main)
        model = self.network
        if setup.world_size > 1:
            device_ids = [setup.device.index] if setup.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(self.network, device_ids=device_ids)
        self.model = torch.compile(model) if config.compile else model
        self.denoiser = Denoiser(self.model, self.formulation)
        self.grounding_seen = 0.0  # the grounding loss summed over steps since it was last logged

    def describe(self) -> str:
        network = self.config.preset if self.parent is None else f"{self.parent.name}'s"
        trains = ""
        if self.lora_layers:
            adapters = sum(p.numel() for p in self.network.parameters() if p.requires_grad)
            trains = f" ({adapters / 1e3:.1f}k in LoRA adapters on {len(self.lora_layers)} layers train)"
        return (
            f"{network} {self.network_config.kind},"
            f" {count_parameters(self.network) / 1e6:.2f}M parameters{trains}, "
            f"{self.config.formulation} formulation, {self.setup.world_size} process(es) on "
            f"{self.setup.device}, micro-batch {self.micro_batch}; data: {self.source.description}"
        )

    # --- state -----------------------------------------------------------------------------------------

    def resume(self) -> int:
        state = latest_good_state(self.dir)  # damaged checkpoints are logged as warnings
        if state is None:
            self.log(f"no checkpoint in {self.dir}: starting from scratch")
            return 0
        try:
            self.network.load_state_dict(state["model"])
            self.ema.module.load_state_dict(state["ema"])
            load_optimizer_state(self.optimizer, state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UnnoiseError(
                f"the checkpoint in {self.dir} does not fit this model (a different --preset or"
                f" --resolution?): {str(error).splitlines()[0]}"
            ) from None
        self.log(f"resumed from step {state['step']}")
        self.repair_release(int(state["step"]))
        return int(state["step"])

    def repair_release(self, step: int) -> None:
        """A run killed while writing its release leaves model/ a checkpoint behind: write it again."""
        if not self.setup.is_main:
            return
        released = released_steps(self.dir / "model")
        if released != step:
            self.log(f"the release in {self.dir / 'model'} was at step {released}: writing step {step}'s")
            self.write_release(step)

    def save(self, step: int) -> None:
        if self.setup.is_main:
            extra = {"images_seen": step * self.config.batch_size, "config": asdict(self.config)}
            save_training_state(
                self.dir,
                step,
                model=self.network,
                ema=self.ema.module,
                optimizer=self.optimizer,
                extra=extra,
                keep=self.config.keep_checkpoints,
            )
            self.write_release(step)
        barrier(self.setup)

    def write_release(self, step: int) -> None:
        c, folder = self.config, self.dir / "model"
        if self.lora_layers:  # the adapters alone, for `--lora` on the base model
            base = {"name": self.parent.name, "weights_sha256": self.parent.digest, "steps": step}
            save_lora(folder, self.ema.module, self.lora_layers, c.lora_alpha or c.lora_rank, base)
            return
        if self.codec is not None:  # first the codec, so no config ever names a missing one
            copy_codec(Path(c.autoencoder), folder / CODEC_FOLDER)
        release = release_config(
            folder,
            self.network_config,
            formulation=c.formulation,
            text_encoder=c.text_encoder,
            text_fingerprint=self.text.name,
            max_tokens=c.max_tokens,
            token_layers=c.text_token_layers,
            steps=step,
            images_seen=step * c.batch_size,
            defaults={"bind_attributes": True} if c.bind_attributes else None,  # how it learned to read
            codec=None if self.codec is None else {"kind": "autoencoder", "folder": CODEC_FOLDER},
            resolution=self.resolution,
        )
        if self.parent is not None:
            release["parent"] = {"name": self.parent.name, "weights_sha256": self.parent.digest}
        try:
            save_release(folder, self.ema.module, release)
        except WriteFailedError as error:
            raise WriteFailedError(
                f"{error}; step {step}'s checkpoint is saved in {self.dir}: free some space, then --resume"
                " writes the release from it"
            ) from error

    # --- one step --------------------------------------------------------------------------------------

    def positions(self, step: int, micro: int) -> list[int]:
        """Global sample positions of this process's share of micro-batch `micro` of `step`."""
        first = (step * self.config.grad_accumulation + micro) * self.setup.world_size + self.setup.rank
        return list(range(first * self.micro_batch, (first + 1) * self.micro_batch))

    def micro_batches(self, start_step: int) -> Iterator[Batch]:
        """This process's micro-batches from `start_step` on, made ahead by `config.data_workers` processes.

        Batch k is micro-batch k % accumulation of step k // accumulation; a batch depends only on its
        positions, so workers change when it is made, never what it holds.
        """
        c = self.config
        plan = MicroBatchPlan(self, c.grad_accumulation)
        loader = torch.utils.data.DataLoader(
            plan,
            batch_size=None,  # the plan's items are whole micro-batches
            sampler=range(start_step * c.grad_accumulation, c.steps * c.grad_accumulation),
            num_workers=c.data_workers,
            prefetch_factor=4 if c.data_workers else None,
            worker_init_fn=_one_thread_per_worker,
            pin_memory=self.setup.device.type == "cuda",
        )
        return iter(loader)

    def micro_batch_loss(self, batch: Batch) -> torch.Tensor:
        c = self.config
        device = self.setup.device
        images = batch.images.to(device, memory_format=torch.channels_last if device.type == "cpu" else None)
        sigma, noise = batch.sigma.to(device), batch.noise.to(device)
        text = self.text.encode(batch.captions).to(device)
        if c.bind_attributes:
            text = text.with_phrases([attribute_phrases(self.text.token_strings(t)) for t in batch.captions])
        weight = min_snr_weight(sigma, c.min_snr_gamma) if c.loss_weighting == "min_snr" else None
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)
        if not c.grounding_weight:
            with autocast:
                return self.denoiser.loss(images, sigma, noise, text, weight=weight).mean()
        with autocast, recorded_cross_attention(self.network) as maps:
            loss = self.denoiser.loss(images, sigma, noise, text, weight=weight).mean()
        tokens = [self.text.token_strings(caption) for caption in batch.captions]
        masks, grounded = token_masks(batch.word_masks, tokens, text.tokens.shape[1])
        grounding = grounding_loss(maps, masks.to(device), grounded.to(device))
        self.grounding_seen += float(grounding.detach()) / c.grad_accumulation  # logged apart
        return loss + c.grounding_weight * grounding

    def backward(self, batches: Iterator[Batch]) -> float:
        """Gradients of the mean loss over the global batch, whose micro-batches `batches` yields next;
        returns this process's mean loss, the grounding loss (if any) included; its own mean is added to
        `grounding_seen`."""
        total = 0.0
        for micro in range(self.config.grad_accumulation):
            last = micro == self.config.grad_accumulation - 1
            sync = contextlib.nullcontext() if last or self.setup.world_size == 1 else self.model.no_sync()
            with sync:
                loss = self.micro_batch_loss(next(batches)) / self.config.grad_accumulation
                loss.backward()
            total += float(loss.detach())
        return total

    def step(self, batches: Iterator[Batch], step: int) -> StepTaken:
        """Training step `step` (from 0): the schedule's learning rate, gradients over the global batch whose
        micro-batches `batches` yields next, clipping, AdamW and the EMA update. A non-finite loss or
        gradient changes nothing: the gradients are dropped, the grounding loss it added is taken back, and
        the result says `finite=False`."""
        c = self.config
        lr = learning_rate(c, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grounding_before = self.grounding_seen
        loss = self.backward(batches)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.network.parameters(), c.grad_clip))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.grounding_seen = grounding_before  # a skipped step is not logged
            return StepTaken(loss, grad_norm, lr, finite=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        images_seen = (step + 1) * c.batch_size
        self.ema.update(self.network, ema_decay(c.batch_size, images_seen, c.ema_half_life, c.ema_warmup))
        return StepTaken(loss, grad_norm, lr, finite=True)


@dataclass(frozen=True)
class StepTaken:
    """What one training step did: this process's mean loss (grounding included), the gradient's norm
    before clipping, the learning rate; `finite` False when the step was skipped."""

    loss: float
    grad_norm: float
    lr: float
    finite: bool


class MicroBatchPlan(torch.utils.data.Dataset):
    """Item k: this process's micro-batch k % accumulation of step k // accumulation (see train/data.py)."""

    def __init__(self, run: Run, accumulation: int):
        c = run.config
        self.positions, self.accumulation, self.source = run.positions, accumulation, run.source
        self.options = dict(
            formulation=run.formulation, seed=c.seed, cond_dropout=c.cond_dropout, flip=c.flip,
            grounding=c.grounded_words(),
        )  # fmt: skip

    def __getitem__(self, k: int) -> Batch:
        step, micro = divmod(k, self.accumulation)
        return make_batch(self.source, self.positions(step, micro), **self.options)


def _one_thread_per_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers are processes already: threads would only contend


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to config.lr, then by `lr_schedule`: constant, with a linear decay to 0 over the last
    `lr_decay_fraction` of the steps (warm-up, stable, decay: Hu et al. 2024); or from the peak down to 0 at
    the last step, linearly or along a half cosine (Loshchilov & Hutter 2017, without restarts)."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_schedule == "constant":
        decay_steps = config.lr_decay_fraction * config.steps
        decay = min(1.0, (config.steps - step) / decay_steps) if decay_steps > 0 else 1.0
        return config.lr * min(warmup, decay)
    after = max(0.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))  # 0 -> 1
    decay = 1 - after if config.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * after))
    return config.lr * min(warmup, decay)


@dataclass(frozen=True)
class Parent:
    """The release a run fine-tunes (--init-from): its folder, config and network."""

    folder: Path
    config: dict
    network: object  # its NetworkConfig

    @classmethod
    def of(cls, name: str) -> Parent:
        from ..nn.presets import network_config_from_dict
        from ..release import check_release_config, read_release_config, resolve_model

        folder = resolve_model(name)
        if not (folder / "config.json").is_file():
            raise UnnoiseError(
                f"--init-from {name}: fine-tuning starts from unnoise's own releases (a Stable Diffusion"
                " model is not one yet)"
            )
        config = read_release_config(folder)
        check_release_config(folder, config)
        try:
            network = network_config_from_dict(config.get("network") or config["unet"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UnnoiseError(f"--init-from {folder}: config.json describes no network ({error})") from None
        return cls(folder, config, network)

    @property
    def name(self) -> str:
        from ..release import model_name

        return model_name(self.folder)

    @property
    def digest(self) -> str:
        return str(self.config.get("weights_sha256", ""))

    def weights(self) -> dict[str, torch.Tensor]:
        from ..release import materialise

        return materialise(self.folder, self.network, self.config).state_dict()

    def inherited(self, config: TrainConfig) -> TrainConfig:
        """The run's config with what the parent fixes: formulation, text encoder, autoencoder and size."""
        from ..release import CODEC_FOLDER, locate_text_encoder

        encoder = self.config["text_encoder"]
        codec = self.folder / CODEC_FOLDER if self.config.get("codec") else None
        resolution = self.config.get("resolution") or self.network.resolution
        if config.autoencoder and (codec is None or Path(config.autoencoder).resolve() != codec.resolve()):
            raise UnnoiseError("--init-from keeps the model's own autoencoder: leave --autoencoder out")
        if config.resolution not in (None, resolution):
            raise UnnoiseError(f"--init-from keeps the model's size ({resolution}): leave --resolution out")
        return replace(
            config, formulation=self.config["formulation"],
            text_encoder=locate_text_encoder(self.folder, encoder["name"]),
            max_tokens=encoder["max_tokens"], text_token_layers=encoder.get("token_layers", "last"),
            autoencoder=str(codec) if codec is not None else "", resolution=resolution,
        )  # fmt: skip


def pixel_resolution(config: TrainConfig, codec, log: Callable[[str], None]) -> int:
    """The images' side: --resolution; else a latent model's autoencoder's; else a folder's image size
    (said, with the sizes when they differ); else the preset's."""
    if codec is not None:
        trained_at = codec.autoencoder.config.resolution
        if config.resolution not in (None, trained_at):
            raise UnnoiseError(
                f"--resolution {config.resolution}: the autoencoder {config.autoencoder} was trained at"
                f" {trained_at}x{trained_at}; train at that size, or train an autoencoder at"
                f" {config.resolution} (unnoise train-autoencoder --resolution {config.resolution})"
            )
        return trained_at
    if config.resolution is not None:
        return config.resolution
    if config.data != "shapes" and Path(config.data).is_dir():
        from ..data.folder import folder_resolution

        return folder_resolution(config.data, config.caption_column, log)
    return PRESETS[config.preset].resolution


def network_shape(config: TrainConfig, codec, resolution: int):
    """The preset's network at the size (and, for a latent model, the channels) it will see."""
    preset = PRESETS[config.preset]
    factor = 1 if codec is None else codec.factor
    if resolution % factor:
        raise UnnoiseError(f"--resolution {resolution} is not a multiple of the autoencoder's {factor}")
    changes = {"resolution": resolution // factor}
    if codec is not None:
        changes["in_channels"] = codec.channels
    try:
        return replace(preset, **changes)
    except ValueError as error:
        raise UnnoiseError(f"--resolution {resolution} for --preset {config.preset}: {error}") from None


def copy_codec(source: Path, folder: Path) -> None:
    """The autoencoder release beside the model's (its config and weights), unless an identical one is."""
    import shutil

    from ..release import read_release_config, weights_path

    wanted = read_release_config(source).get("weights_sha256")
    if (folder / "config.json").is_file() and read_release_config(folder).get("weights_sha256") == wanted:
        return
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (weights_path(source, read_release_config(source)).name, "config.json"):
        shutil.copyfile(source / name, tmp / name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix multiplies run in hardware: CUDA with bf16, or a CPU with AVX-512 BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def training_formulation(config: TrainConfig):
    """The formulation, with EDM's training density of log sigma moved where the config says."""
    formulation = FORMULATIONS[config.formulation]
    moved = {
        name: value
        for name, value in (("p_mean", config.sigma_p_mean), ("p_std", config.sigma_p_std))
        if value is not None
    }
    if moved and not hasattr(formulation, "p_mean"):
        raise UnnoiseError(
            f"--sigma-p-mean and --sigma-p-std set EDM's log-normal training density; the"
            f" {config.formulation!r} formulation has its own"
        )
    return replace(formulation, **moved)


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train until config.steps; returns the folder of the released model (EMA weights).

    Messages go to the `unnoise.train` logger, printed on stdout when the application configured no
    logging; only the first process speaks."""
    config.validate()
    setup = init_distributed(config.device)
    if setup.is_main:
        show_messages_on_the_terminal()
    else:
        logger.setLevel(logging.ERROR)  # the other processes would repeat what the first says
    try:
        return _train(config, setup, resume)
    finally:
        shutdown(setup)


class TerminalHandler(logging.Handler):
    """Each message as a bare line on stdout, as `print` would (the stdout of the moment, so a redirect
    applies)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


def show_messages_on_the_terminal() -> None:
    """Print the loop's messages unless the application has a handler for them (on `unnoise.train` or a
    logger above it, such as the root logger of `logging.basicConfig`)."""
    if not logger.hasHandlers():
        logger.addHandler(TerminalHandler())
        logger.setLevel(logging.INFO)


def _train(config: TrainConfig, setup: Distributed, resume: bool) -> Path:
    run_dir = Path(config.out)
    with RunLock(run_dir) if setup.is_main else contextlib.nullcontext():  # rank 0 is the one writer
        return _train_locked(config, setup, resume, run_dir)


def _train_locked(config: TrainConfig, setup: Distributed, resume: bool, run_dir: Path) -> Path:
    if setup.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume and any(run_dir.glob("state-*")):
            raise UnnoiseError(
                f"{run_dir} already holds a training run: pass --resume, or choose another --out"
            )
        if remove_temporaries(run_dir):  # what a killed write left; only rank 0 ever writes here
            logger.info(f"removed the half-written files a stopped run left in {run_dir}")
    barrier(setup)
    run = Run(config, setup)
    logger.info(run.describe())
    start = run.resume() if resume else 0
    if setup.is_main:  # only once the model and its checkpoint agree: a refused resume keeps the old one
        (run_dir / "config.json").write_text(config.to_json())
    if start >= config.steps:
        logger.info(f"already trained for {start} steps (--steps {config.steps})")
        return run_dir / "model"

    metrics = MetricsLog(run_dir / "log.csv", enabled=setup.is_main)
    board = Board(run_dir / "tensorboard", enabled=setup.is_main and config.tensorboard)
    validation_log = ValidationLog(run_dir / "validation.csv", enabled=setup.is_main)
    grounding_log = MetricsLog(  # the grounding loss apart: log.csv's loss stays the diffusion loss
        run_dir / "grounding.csv",
        enabled=setup.is_main and config.grounding_weight > 0,
        fields=GROUNDING_FIELDS,
    )
    batches = run.micro_batches(start)
    bad_in_a_row, window_start, window_loss, window_steps = 0, time.perf_counter(), 0.0, 0
    last_checkpoint, estimated = time.perf_counter(), False
    with progress_bar(start, config.steps, enabled=setup.is_main) as progress:  # closed on an error too
        for step in range(start, config.steps):
            taken = run.step(batches, step)
            if not taken.finite:
                bad_in_a_row += 1
                logger.warning(f"step {step}: non-finite loss or gradient ({taken.loss}); step skipped")
                if bad_in_a_row >= config.max_bad_steps:
                    raise UnnoiseError(
                        f"training diverged: {bad_in_a_row} non-finite losses in a row at step {step}. The"
                        f" last good checkpoint is in {run_dir}; lower --lr or use --precision fp32, then"
                        " --resume"
                    )
                continue
            bad_in_a_row = 0
            window_loss, window_steps = window_loss + taken.loss, window_steps + 1
            done = step + 1

            if done % config.log_every == 0 or done == config.steps:
                grounding = float(mean_across(torch.tensor(run.grounding_seen / window_steps), setup))
                diffusion = window_loss / window_steps - config.grounding_weight * grounding
                mean_loss = float(mean_across(torch.tensor(diffusion), setup))
                rate = window_steps * config.batch_size / (time.perf_counter() - window_start)
                metrics.write(
                    step=done, loss=mean_loss, lr=taken.lr, grad_norm=taken.grad_norm, images_per_s=rate
                )
                board.scalars(done, loss=mean_loss, lr=taken.lr, grad_norm=taken.grad_norm, images_per_s=rate)
                grounding_log.write(step=done, grounding_loss=grounding)
                run.grounding_seen = 0.0
                progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.1f}")
                if not estimated and done < config.steps:
                    logger.info(time_estimate(config, done, rate))
                    estimated = True
                window_start, window_loss, window_steps = time.perf_counter(), 0.0, 0
                overdue = checkpoint_overdue(config, time.perf_counter() - last_checkpoint, setup)
            else:
                overdue = False
            if done % config.checkpoint_every == 0 or done == config.steps or overdue:
                run.save(done)
                last_checkpoint = time.perf_counter()
                validation = validation_loss(run) if setup.is_main else None
                if validation is not None:  # held-out images at fixed noise levels, with each checkpoint
                    validation_log.write(done, validation)
                    board.scalars(done, "validation", **validation)
            if (
                setup.is_main
                and config.sample_every
                and (done % config.sample_every == 0 or done == config.steps)
            ):
                grid = save_sample_grid(run, run_dir / "samples" / f"step-{done:08d}.png")
                board.image("samples", grid, done)
            progress.update(1)
    board.close()
    logger.info(f"done: {config.steps} steps; model in {run_dir / 'model'}")
    return run_dir / "model"


def time_estimate(config: TrainConfig, done: int, images_per_s: float) -> str:
    """What the rest of the run costs at the speed of its first logged steps, said once, up front."""
    seconds = (config.steps - done) * config.batch_size / images_per_s
    finish = time.strftime("%H:%M", time.localtime(time.time() + seconds))
    every = f"every {config.checkpoint_every} steps"
    if config.checkpoint_minutes:
        every += f" and every {config.checkpoint_minutes:g} minutes"
    return (
        f"at {images_per_s:.1f} images/s the {config.steps - done} steps left take about"
        f" {duration(seconds)} (done near {finish}); a checkpoint {every}"
    )


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


def checkpoint_overdue(config: TrainConfig, seconds_since: float, setup) -> bool:
    """Whether --checkpoint-minutes have passed since the last checkpoint, as rank 0's clock says: every
    rank takes the same decision (one collective at a logging step, which every rank reaches together)."""
    if not config.checkpoint_minutes:
        return False
    due = torch.tensor(float(seconds_since >= 60 * config.checkpoint_minutes and setup.is_main))
    return bool(mean_across(due, setup) > 0)


class ValidationLog:
    """validation.csv: step, then the validation loss at each fixed noise level and their mean."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, step: int, losses: dict[str, float]) -> None:
        if not self.enabled:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            if new:
                csv.writer(f).writerow(["step", *losses])
            csv.writer(f).writerow([step, *(f"{v:.6f}" for v in losses.values())])


LOG_FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s", "time")  # loss: the diffusion loss
GROUNDING_FIELDS = ("step", "grounding_loss", "time")


class MetricsLog:
    """A CSV of one row per logging step (appended across resumes): log.csv, grounding.csv."""

    def __init__(self, path: Path, enabled: bool, fields: tuple[str, ...] = LOG_FIELDS):
        self.path, self.enabled, self.fields = path, enabled, fields
        if enabled and not path.exists():
            path.write_text(",".join(fields) + "\n")

    def write(self, **values) -> None:
        if self.enabled:
            values["time"] = round(time.time(), 1)
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([values[k] for k in self.fields])


def progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, disable=not enabled, unit="step", dynamic_ncols=True)


@torch.no_grad()
def save_sample_grid(run: Run, path: Path, steps: int = DEFAULT_STEPS):
    """The EMA model's images for fixed prompts and seeds (prompt i, seed i), to watch training progress."""
    from ..images import contact_sheet
    from ..pipeline import Pipeline

    prompts = (
        run.config.prompts()
        if run.config.sample_prompts
        else SAMPLE_PROMPTS.get(run.config.data) or list(dict.fromkeys(run.source.captions))[:8]
    )
    resolution = run.resolution
    denoiser = Denoiser(run.ema.module, run.formulation)
    pipe = Pipeline(denoiser, run.text, resolution, name=run.dir.name, codec=run.codec)
    images = pipe.render_each(
        [
            pipe.settings(p, "", DEFAULT_SAMPLER, None, steps, DEFAULT_GUIDANCE, i).replace(
                bind_attributes=run.config.bind_attributes  # as the release will sample
            )
            for i, p in enumerate(prompts)
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet = contact_sheet(images, prompts, scale=max(1, 96 // resolution), columns=4)
    sheet.save(path)
    return sheet
