"""Training the image codec: `unnoise train-autoencoder --data FOLDER`, one linear loop like `train`'s.

Losses need no downloaded network: an L1 pixel loss, plus an L1 loss on the image's finite differences
(`gradient_loss`: edges are where an L1- or L2-trained autoencoder blurs) and on its Fourier amplitudes
(`frequency_loss`: the fine texture that blurs first; Jiang et al. 2021, "Focal Frequency Loss", without
the focal weights). The concepts of a fixed, seeded held-out split (data.split) never train it; the
release's card measures reconstruction on them (PSNR, SSIM). The release is the EMA weights with the
per-channel latent statistics of the training images (codec.LatentStatistics).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..codec import LatentStatistics
from ..data.folder import ImageFolderDataset, to_unit_range
from ..data.split import DEFAULT_HELD_OUT, held_out_mask
from ..errors import UnnoiseError
from ..images import psnr, ssim
from ..nn.autoencoder import AUTOENCODER_PRESETS, Autoencoder
from ..nn.unet import count_parameters
from ..release import AUTOENCODER_FORMAT, WriteFailedError, save_release
from .checkpoint import (
    RunLock,
    latest_good_state,
    load_optimizer_state,
    remove_temporaries,
    save_training_state,
)
from .config import RunConfig, option
from .ema import EMA, ema_decay
from .loop import MetricsLog, native_bf16, progress_bar, show_messages_on_the_terminal

logger = logging.getLogger("unnoise.train")
AE_LOG_FIELDS = ("step", "loss", "l1", "gradient", "frequency", "psnr", "lr", "images_per_s", "time")


@dataclass
class AutoencoderTrainConfig(RunConfig):
    data: str = option("", "a folder of images (captions are used only to keep the held-out concepts apart)")
    preset: str = option("f4c4", "tiny, f4c4 (64x64 -> 16x16x4), f4c8 (16x16x8) or f8c8 (8x8x8)")
    resolution: int | None = option(
        None, "image side in pixels (default: the folder's, when its images agree)"
    )
    background: str = option("#ffffff", "colour behind transparent pixels")
    caption_column: str = option("text", "the caption column of the folder's metadata")
    held_out: float = option(DEFAULT_HELD_OUT, "fraction of the concepts kept out of training, to measure on")
    flip: bool = option(True, "random horizontal flips")
    steps: int = option(6000, "optimizer steps in all (a resumed run stops there too)")
    batch_size: int = option(32, "images per step")
    lr: float = option(4e-4, "Adam's peak learning rate (linear warm-up, cosine decay to a tenth)")
    warmup_steps: int = option(200, "steps of linear warm-up")
    gradient_weight: float = option(1.0, "weight of the L1 loss on the images' finite differences (edges)")
    frequency_weight: float = option(0.0, "weight of the L1 loss on the images' Fourier amplitudes")
    ema_half_life: float = option(20_000.0, "EMA half-life in training images")
    precision: str = option("auto", "auto (bf16 where the hardware has it), fp32 or bf16")
    device: str = option("auto", "auto, cpu, cuda, ...")
    seed: int = option(0, "seeds the data order, the flips, the initial weights and the held-out split")
    out: str = option("runs/autoencoder", "the run's folder: model/ (the release), state-*/, log.csv")
    log_every: int = option(50, "steps between rows of log.csv")
    checkpoint_every: int = option(500, "steps between resumable checkpoints and releases")
    keep_checkpoints: int = option(2, "the newest this many checkpoints are kept")

    def validate(self) -> AutoencoderTrainConfig:
        if not self.data:
            raise UnnoiseError("train-autoencoder needs --data FOLDER")
        if self.preset not in AUTOENCODER_PRESETS:
            raise UnnoiseError(
                f"unknown autoencoder preset {self.preset!r}; choose from {', '.join(AUTOENCODER_PRESETS)}"
            )
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UnnoiseError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if not 0 <= self.held_out < 1:
            raise UnnoiseError(f"--held-out must be in [0, 1), got {self.held_out}")
        if not 0 < self.lr < float("inf"):
            raise UnnoiseError(f"--lr must be a positive number, got {self.lr}")
        for name in ("gradient_weight", "frequency_weight", "ema_half_life"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise UnnoiseError(f"--{name.replace('_', '-')} must be a number >= 0")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UnnoiseError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.resolution is not None and not 8 <= self.resolution <= 1024:
            raise UnnoiseError(f"--resolution must be in 8..1024 pixels, got {self.resolution}")
        return self


# --- the losses ----------------------------------------------------------------------------------------


def gradient_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of the horizontal and vertical finite differences of x and y (B, C, H, W)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def frequency_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance of the 2-D Fourier amplitudes of x and y (B, C, H, W), orthonormal FFT."""
    return (
        (torch.fft.rfft2(x.float(), norm="ortho").abs() - torch.fft.rfft2(y.float(), norm="ortho").abs())
        .abs()
        .mean()
    )


# --- the loop ------------------------------------------------------------------------------------------


def learning_rate(config: AutoencoderTrainConfig, step: int) -> float:
    """Linear warm-up, then a cosine from the peak down to a tenth of it at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def split_folder(
    config: AutoencoderTrainConfig, resolution: int
) -> tuple[ImageFolderDataset, torch.Tensor, torch.Tensor]:
    """The folder's images as (dataset, training pixels (N, 3, R, R) uint8, held-out pixels (M, 3, R, R))."""
    from PIL import ImageColor

    try:
        background = ImageColor.getrgb(config.background)[:3]
    except ValueError:
        raise UnnoiseError(f"--background {config.background!r} is not a colour (try '#ffffff')") from None
    dataset = ImageFolderDataset(
        config.data, resolution=resolution, background=background, caption_column=config.caption_column
    )
    held = torch.tensor(held_out_mask(dataset.captions, config.held_out, config.seed))
    pixels = dataset.pixels  # (N, 3, R, R) uint8
    if held.all():
        raise UnnoiseError(f"every concept of {config.data} fell in the held-out split: lower --held-out")
    return dataset, pixels[~held], pixels[held]


def train_autoencoder(config: AutoencoderTrainConfig, *, resume: bool = False) -> Path:
    """Train until config.steps; returns the release folder (EMA weights + latent statistics + card)."""
    config.validate()
    show_messages_on_the_terminal()
    with RunLock(Path(config.out)):
        return _train_autoencoder(config, resume)


def _train_autoencoder(config: AutoencoderTrainConfig, resume: bool) -> Path:
    from ..data.folder import folder_resolution
    from ..pipeline import resolve_device

    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and any(run_dir.glob("state-*")):
        raise UnnoiseError(f"{run_dir} already holds a training run: pass --resume, or choose another --out")
    remove_temporaries(run_dir)
    device = resolve_device(config.device)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and native_bf16(device))
    resolution = config.resolution or folder_resolution(config.data, config.caption_column, logger.info)
    preset = AUTOENCODER_PRESETS[config.preset]
    try:
        from dataclasses import replace

        network_config = replace(preset, resolution=resolution)
    except ValueError as error:
        raise UnnoiseError(
            f"--resolution {resolution} for autoencoder preset {config.preset}: {error}"
        ) from None
    dataset, train_pixels, held_pixels = split_folder(config, resolution)
    logger.info(
        f"{config.data}: {dataset.report.summary()}; {len(train_pixels)} images train, {len(held_pixels)}"
        f" held out (their concepts, {config.held_out:.0%} of all, seed {config.seed})"
    )
    torch.manual_seed(config.seed)
    model = Autoencoder(network_config).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.99))
    side = resolution // network_config.factor
    logger.info(
        f"autoencoder {config.preset}: {count_parameters(model) / 1e6:.2f}M parameters, {resolution}x"
        f"{resolution} -> {network_config.latent_channels}x{side}x{side},"
        f" {'bf16' if bf16 else 'fp32'} on {device}"
    )
    start = 0
    if resume:
        state = latest_good_state(run_dir)
        if state is not None:
            try:
                model.load_state_dict(state["model"])
                ema.module.load_state_dict(state["ema"])
                load_optimizer_state(optimizer, state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as error:
                raise UnnoiseError(
                    f"the checkpoint in {run_dir} does not fit this autoencoder (another --preset or"
                    f" --resolution?): {str(error).splitlines()[0]}"
                ) from None
            start = int(state["step"])
            logger.info(f"resumed from step {start}")
    (run_dir / "config.json").write_text(config.to_json())
    if start >= config.steps:
        logger.info(f"already trained for {start} steps (--steps {config.steps})")
        return write_autoencoder_release(
            run_dir, ema.module, config, start, train_pixels, held_pixels, device
        )

    metrics = MetricsLog(run_dir / "log.csv", enabled=True, fields=AE_LOG_FIELDS)
    window: dict[str, float] = {}
    window_start, window_steps = time.perf_counter(), 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with progress_bar(start, config.steps, enabled=True) as progress:
        for step in range(start, config.steps):
            x = batch_at(train_pixels, step, config).to(
                device, memory_format=torch.channels_last if device.type == "cpu" else None
            )
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                y = model(x)
            y = y.float()
            terms = {"l1": (y - x).abs().mean(), "gradient": gradient_loss(y, x)}
            terms["frequency"] = frequency_loss(y, x) if config.frequency_weight else torch.zeros(())
            loss = (
                terms["l1"]
                + config.gradient_weight * terms["gradient"]
                + config.frequency_weight * terms["frequency"]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.update(
                model, ema_decay(config.batch_size, (step + 1) * config.batch_size, config.ema_half_life, 0.1)
            )
            for name, value in {"loss": loss, **terms, "psnr": psnr(y.detach(), x).mean()}.items():
                window[name] = window.get(name, 0.0) + float(value.detach())
            window_steps += 1
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                rate = window_steps * config.batch_size / (time.perf_counter() - window_start)
                means = {name: value / window_steps for name, value in window.items()}
                metrics.write(step=done, lr=lr, images_per_s=rate, **means)
                progress.set_postfix(
                    loss=f"{means['loss']:.4f}", psnr=f"{means['psnr']:.1f}", img_s=f"{rate:.0f}"
                )
                window, window_start, window_steps = {}, time.perf_counter(), 0
            if done % config.checkpoint_every == 0 or done == config.steps:
                save_training_state(
                    run_dir, done, model=model, ema=ema.module, optimizer=optimizer,
                    extra={"config": asdict(config)}, keep=config.keep_checkpoints,
                )  # fmt: skip
                write_autoencoder_release(
                    run_dir, ema.module, config, done, train_pixels, held_pixels, device
                )
            progress.update(1)
    logger.info(f"done: {config.steps} steps; autoencoder in {run_dir / 'model'}")
    return run_dir / "model"


def batch_at(pixels: torch.Tensor, step: int, config: AutoencoderTrainConfig) -> torch.Tensor:
    """Step's batch (B, 3, R, R) in [-1, 1]: a fresh permutation each epoch, flips by the step's generator,
    so a resumed run sees what an uninterrupted one would."""
    n, b = len(pixels), config.batch_size
    first = step * b
    indices = []
    for position in range(first, first + b):
        epoch = position // n
        order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        indices.append(int(order[position % n]))
    x = to_unit_range(pixels[indices])  # (B, 3, R, R)
    if config.flip:
        flips = torch.rand(b, generator=torch.Generator().manual_seed(config.seed * 7919 + step)) < 0.5
        x[flips] = x[flips].flip(-1)
    return x


@torch.no_grad()
def evaluate(model: Autoencoder, pixels: torch.Tensor, device: torch.device, batch: int = 128) -> dict:
    """Mean PSNR (dB) and SSIM of the reconstructions of `pixels` (N, 3, R, R) uint8."""
    model.eval()
    scores = {"psnr": [], "ssim": []}
    for chunk in pixels.split(batch):
        x = to_unit_range(chunk).to(device)
        y = model(x).clamp(-1, 1)
        scores["psnr"].append(psnr(y, x))
        scores["ssim"].append(ssim(y, x))
    return {name: round(float(torch.cat(values).mean()), 3) for name, values in scores.items()} | {
        "images": len(pixels)
    }


@torch.no_grad()
def raw_latents(
    model: Autoencoder, pixels: torch.Tensor, device: torch.device, batch: int = 128
) -> torch.Tensor:
    return torch.cat([model.encoder(to_unit_range(c).to(device)).float().cpu() for c in pixels.split(batch)])


def write_autoencoder_release(
    run_dir: Path, model: Autoencoder, config: AutoencoderTrainConfig, step: int,
    train_pixels: torch.Tensor, held_pixels: torch.Tensor, device: torch.device,
) -> Path:  # fmt: skip
    """model/: the EMA weights (fp32), the latent statistics of the training images, and held-out quality."""
    statistics = LatentStatistics.measure(raw_latents(model, train_pixels, device))
    release = {
        "format": AUTOENCODER_FORMAT,
        "network": model.config.to_dict(),
        "latent_statistics": asdict(statistics),
        "resolution": model.config.resolution,
        "training": {"steps": step, "images_seen": step * config.batch_size, "data": str(config.data)},
        "evaluation": {"held_out": evaluate(model, held_pixels, device) if len(held_pixels) else None},
    }
    try:
        return save_release(run_dir / "model", model, release, dtype=torch.float32)
    except WriteFailedError as error:
        raise WriteFailedError(
            f"{error}; step {step}'s checkpoint is in {run_dir}: --resume writes the release"
        ) from error
