"""Evaluation on any folder of captioned images: `unnoise eval folder --model M --data FOLDER`.

The folder is split by concept (data.split: a fixed, seeded held-out side; skin-tone variants of one emoji
on one side). Everything is measured in the feature space of a **judge**: a small image-text model trained
contrastively (CLIP's loss, Radford et al. 2021) on the training side only, the frozen MiniLM sentence
vector as its text tower. Why a judge trained here and not a downloaded Inception or CLIP: nothing may be
downloaded, and a seeded random network measures colour statistics more than content, while a judge that
learned which picture goes with which caption measures what a text-to-image model is for. It never sees
a held-out image, and it is cached by the folder's contents, so two models are judged by the same judge.

For the first `captions` captions of each side (one image each, seed i for caption i), it reports:

- **text alignment**: mean cosine of (image, its caption) in the judge's space for the model's images,
  placed between two controls, real images with their own captions (the ceiling) and real images with
  captions shuffled among them (the floor): `fraction = (model - floor) / (ceiling - floor)`;
- **Fréchet distance** (Heusel et al. 2017) and **KID** (Binkowski et al. 2018, unbiased, cubic kernel) of
  the model's images against the real images of the same captions, on the judge's image features;
- **precision, recall** (Kynkäänniemi et al. 2019, k = 5) and **density, coverage** (Naeem et al. 2020);
- **memorisation**: the share of images whose nearest training image is much nearer than the nearest
  training image of another concept (ratio test, d1 / d2 < 0.5: a near copy of one training picture).

For a latent model it also judges the **autoencoder** on every held-out image: PSNR and SSIM of its
reconstructions and their Fréchet distance to the originals on the judge's features, beside the same
distance for the originals blurred (halved and enlarged again, bilinear) as a scale.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.folder import ImageFolderDataset, to_unit_range
from ..data.split import DEFAULT_HELD_OUT, concept_of, held_out_mask
from ..errors import UnnoiseError

JUDGE_SIDE = 32  # the judge looks at images at this size
NEAR_COPY_RATIO = 0.5
NEIGHBOURS = 5


# --- the judge ---------------------------------------------------------------------------------------------


class JudgeImageTower(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> unit vectors (B, D), from features (B, 256) (`features`)."""

    def __init__(self, dim: int = 128):
        super().__init__()
        widths = (32, 64, 128, 256)
        layers, width = [], 3
        for w in widths:  # 32 -> 16 -> 8 -> 4 -> 2
            layers += [
                nn.Conv2d(width, w, 3, padding=1),
                nn.GroupNorm(8, w),
                nn.SiLU(),
                nn.Conv2d(w, w, 3, stride=2, padding=1),
                nn.SiLU(),
            ]
            width = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(JUDGE_SIDE, JUDGE_SIDE), mode="area") if x.shape[-1] != JUDGE_SIDE else x
        return self.body(x).mean((2, 3))  # (B, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=-1)


class Judge(nn.Module):
    """The image tower and a linear map of MiniLM's sentence vector to the same space, with CLIP's learned
    temperature."""

    def __init__(self, text_dim: int = 384, dim: int = 128):
        super().__init__()
        self.image = JudgeImageTower(dim)
        self.text = nn.Sequential(nn.Linear(text_dim, 256), nn.SiLU(), nn.Linear(256, dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_text(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(pooled), dim=-1)

    def loss(self, images: torch.Tensor, pooled: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE; `same` (B, B) marks pairs of one caption (not negatives of each other)."""
        logits = self.log_scale.exp().clamp(max=100) * self.image(images) @ self.embed_text(pooled).T
        logits = logits.masked_fill(same & ~torch.eye(len(same), dtype=torch.bool), float("-inf"))
        target = torch.arange(len(images))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_judge(
    pixels: torch.Tensor, pooled: torch.Tensor, captions: Sequence[str], *, steps: int, seed: int, say=print
) -> Judge:
    """A judge trained on uint8 images (N, 3, R, R) and their captions' sentence vectors (N, 384)."""
    torch.manual_seed(seed)
    judge = Judge(pooled.shape[1])
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_id = torch.tensor([ids[c] for c in captions])
    small = F.interpolate(to_unit_range(pixels), size=(JUDGE_SIDE, JUDGE_SIDE), mode="area")  # (N, 3, s, s)
    batch = min(256, len(pixels))
    for step in range(steps):
        index = torch.randperm(len(pixels), generator=generator)[:batch]
        lr = 2e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        same = caption_id[index][:, None] == caption_id[index][None, :]
        loss = judge.loss(small[index], pooled[index], same)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            say(f"judge step {step + 1}/{steps}: loss {float(loss):.3f}")
    return judge.eval().requires_grad_(False)


# --- the metrics --------------------------------------------------------------------------------


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of features (N, D) and (M, D)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root.real))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (x.y / D + 1)^3 (Binkowski et al. 2018), features (N, D), (M, D)."""
    d = a.shape[1]
    k_aa, k_bb, k_ab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    n, m = len(a), len(b)
    return float(
        (k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
        + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
        - 2 * k_ab.mean()
    )


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (N, M)."""
    squared = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0))


def manifold_metrics(real: np.ndarray, fake: np.ndarray, k: int = NEIGHBOURS) -> dict[str, float]:
    """Precision and recall (k-NN balls), density and coverage, of features (N, D) and (M, D)."""
    k = min(k, len(real) - 1, len(fake) - 1)
    real_radius = np.sort(pairwise(real, real), axis=1)[:, k]  # the k-th neighbour (index 0 is itself)
    fake_radius = np.sort(pairwise(fake, fake), axis=1)[:, k]
    d = pairwise(real, fake)  # (N, M)
    inside_real = d <= real_radius[:, None]  # fake j in the ball of real i
    return {
        "precision": float(inside_real.any(0).mean()),
        "recall": float((d <= fake_radius[None, :]).any(1).mean()),
        "density": float(inside_real.sum(0).mean() / k),
        "coverage": float((d.min(1) <= real_radius).mean()),
    }


def near_copies(samples: np.ndarray, train: np.ndarray, train_concepts: Sequence[str]) -> float:
    """The share of samples (N, D) whose nearest training image is less than NEAR_COPY_RATIO times as far
    as the nearest training image of another concept than that one's."""
    d = pairwise(samples, train)  # (N, M)
    concepts = np.array(train_concepts)
    nearest = d.argmin(1)
    d1 = d[np.arange(len(samples)), nearest]
    other = np.where(concepts[None, :] != concepts[nearest][:, None], d, np.inf)
    d2 = other.min(1)
    return float(np.mean(d1 < NEAR_COPY_RATIO * d2))


# --- the evaluation --------------------------------------------------------------------------------


@dataclass
class FolderSplit:
    """The folder's images (uint8) and captions on each side of the split."""

    train_pixels: torch.Tensor
    train_captions: list[str]
    held_pixels: torch.Tensor
    held_captions: list[str]
    resolution: int


def split_folder(
    data: str | Path, resolution: int, *, held_out: float, seed: int, background=(255, 255, 255)
) -> FolderSplit:
    dataset = ImageFolderDataset(data, resolution=resolution, background=background)
    held = torch.tensor(held_out_mask(dataset.captions, held_out, seed))
    captions = dataset.captions
    if held.all() or not held.any():
        raise UnnoiseError(f"the split of {data} at --held-out {held_out} leaves one side empty")
    return FolderSplit(
        dataset.pixels[~held], [c for c, h in zip(captions, held.tolist(), strict=True) if not h],
        dataset.pixels[held], [c for c, h in zip(captions, held.tolist(), strict=True) if h], resolution,
    )  # fmt: skip


def judge_for(split: FolderSplit, encode_text, cache: Path | None, steps: int, seed: int, say=print) -> Judge:
    """The judge of this split: from `cache` (keyed by the training side's pixels and captions) or trained."""
    from ..release import CorruptCheckpointError, load_tensors, save_tensors

    key = hashlib.sha256(split.train_pixels.numpy().tobytes())
    key.update("\n".join(split.train_captions).encode() + f"{steps}:{seed}".encode())
    path = None if cache is None else Path(cache) / f"judge-{key.hexdigest()[:16]}.safetensors"
    judge = Judge()
    if path is not None and path.is_file():
        try:
            judge.load_state_dict(load_tensors(path))
            return judge.eval().requires_grad_(False)
        except (CorruptCheckpointError, RuntimeError) as error:
            say(f"the cached judge {path} is unusable ({error}): training it again")
    say(f"training the judge on {len(split.train_captions)} training images ({steps} steps, once per folder)")
    pooled = encode_text(split.train_captions)
    judge = train_judge(split.train_pixels, pooled, split.train_captions, steps=steps, seed=seed, say=say)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        save_tensors(judge.state_dict(), tmp)
        tmp.replace(path)
    return judge


def first_of_each_caption(
    pixels: torch.Tensor, captions: list[str], count: int, seed: int
) -> tuple[torch.Tensor, list[str]]:
    """Up to `count` distinct captions (a seeded choice) with the first image of each."""
    first: dict[str, int] = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    chosen = sorted(first)
    random.Random(seed).shuffle(chosen)
    chosen = chosen[:count]
    return pixels[[first[c] for c in chosen]], chosen


@torch.no_grad()
def side_report(
    judge: Judge,
    real: torch.Tensor,
    captions: list[str],
    generated: torch.Tensor,
    pooled: torch.Tensor,
    train_features: np.ndarray,
    train_concepts: list[str],
    seed: int,
) -> dict:
    """The metrics of one side: real (N, 3, R, R) uint8 of `captions`, generated (N, 3, R, R) in [-1, 1]."""
    text = judge.embed_text(pooled)  # (N, D)
    real_x = to_unit_range(real)
    real_emb, fake_emb = judge.image(real_x), judge.image(generated)
    shuffled = derangement(len(captions), seed)
    ceiling = float((real_emb * text).sum(1).mean())
    floor = float((real_emb * text[shuffled]).sum(1).mean())
    model = float((fake_emb * text).sum(1).mean())
    real_f, fake_f = judge.image.features(real_x).numpy(), judge.image.features(generated).numpy()
    return {
        "captions": len(captions),
        "text_alignment": {
            "model": round(model, 4), "ceiling": round(ceiling, 4), "floor": round(floor, 4),
            "fraction": round((model - floor) / (ceiling - floor), 4) if ceiling > floor else None,
        },
        "fd": round(frechet_distance(real_f, fake_f), 4),
        "kid": round(kernel_inception_distance(real_f, fake_f), 5),
        **{k: round(v, 4) for k, v in manifold_metrics(real_f, fake_f).items()},
        "near_copies": round(near_copies(fake_f, train_features, train_concepts), 4),
    }  # fmt: skip


@torch.no_grad()
def codec_report(judge: Judge, codec, pixels: torch.Tensor, batch: int = 128) -> dict:
    """How well `codec` (encode, decode) reconstructs `pixels` (N, 3, R, R) uint8 in the judge's eyes."""
    from ..images import psnr, ssim

    originals, reconstructions = [], []
    for chunk in pixels.split(batch):
        x = to_unit_range(chunk)  # (b, 3, R, R) in [-1, 1]
        originals.append(x)
        reconstructions.append(codec.decode(codec.encode(x)).float().clamp(-1, 1))
    x, y = torch.cat(originals), torch.cat(reconstructions)
    side = x.shape[-1]
    blurred = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear"), size=side, mode="bilinear")
    real_f = judge.image.features(x).numpy()
    return {
        "images": len(x),
        "psnr": round(float(psnr(y, x).mean()), 3),
        "ssim": round(float(ssim(y, x).mean()), 4),
        "fd": round(frechet_distance(real_f, judge.image.features(y).numpy()), 4),
        "fd_blurred_control": round(frechet_distance(real_f, judge.image.features(blurred).numpy()), 4),
    }


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation with no fixed point (each caption goes to another image)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[(order.index(i) + 1) % n] for i in range(n)]


def evaluate_folder(
    generate: Callable[[list[str], int], torch.Tensor],
    encode_text: Callable[[list[str]], torch.Tensor],
    split: FolderSplit,
    *,
    captions: int = 300,
    judge_steps: int = 1500,
    judge_cache: Path | None = None,
    seed: int = 0,
    codec=None,
    say=print,
) -> dict:
    """The report. generate(captions, first_seed) -> images (N, 3, R, R) in [-1, 1], caption i with seed
    first_seed + i; encode_text(captions) -> MiniLM sentence vectors (N, 384); codec: the model's
    autoencoder (encode, decode), judged on the held-out images, or None for a pixel model."""
    judge = judge_for(split, encode_text, judge_cache, judge_steps, seed, say)
    with torch.no_grad():
        train_features = torch.cat(
            [judge.image.features(to_unit_range(c)) for c in split.train_pixels.split(512)]
        ).numpy()
    train_concepts = [concept_of(c) for c in split.train_captions]
    report = {"judge": {"steps": judge_steps, "side": JUDGE_SIDE, "trained_on": len(split.train_captions)}}
    for side, pixels, names in (
        ("train", split.train_pixels, split.train_captions),
        ("held_out", split.held_pixels, split.held_captions),
    ):
        real, chosen = first_of_each_caption(pixels, names, captions, seed)
        say(f"{side}: drawing {len(chosen)} images, one per caption")
        generated = generate(chosen, seed)
        report[side] = side_report(
            judge, real, chosen, generated, encode_text(chosen), train_features, train_concepts, seed
        )
    if codec is not None:
        say(f"autoencoder: reconstructing the {len(split.held_captions)} held-out images")
        report["autoencoder"] = codec_report(judge, codec, split.held_pixels)
    return report


def run_folder_eval(
    model: str,
    data: str,
    *,
    held_out: float = DEFAULT_HELD_OUT,
    split_seed: int = 0,
    captions: int = 300,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str = "auto",
    judge_steps: int = 1500,
    judge_cache: Path | None = None,
    say=print,
) -> dict:
    """`evaluate_folder` for a released model on a folder, with the packaged MiniLM as the judge's text."""
    import unnoise

    from ..settings import DEFAULT_SAMPLER, DEFAULT_STEPS
    from ..text.encoders import load_text_encoder

    pipe = unnoise.load(model, device=device)
    split = split_folder(data, pipe.resolution, held_out=held_out, seed=split_seed)
    minilm = load_text_encoder("minilm", max_tokens=32)

    def encode_text(texts: list[str]) -> torch.Tensor:
        return torch.cat([minilm.encode(list(chunk)).pooled.float().cpu() for chunk in chunked(texts, 256)])

    from .shapes_eval import torchrun_shard

    rank, world = torchrun_shard()

    def generate(texts: list[str], first_seed: int) -> torch.Tensor:
        """Image i of `texts` from seed first_seed + i; under torchrun each process makes every world-th
        one and all gather them (an image does not depend on the batch it is made in)."""
        from ..images import from_pil

        mine = list(range(rank, len(texts), world))
        made = []
        for start in range(0, len(mine), 16):
            chunk = mine[start : start + 16]
            each = [
                pipe.settings(
                    texts[i], "", sampler or DEFAULT_SAMPLER, None, steps or DEFAULT_STEPS, guidance,
                    first_seed + i,
                )
                for i in chunk
            ]  # fmt: skip
            made += list(zip(chunk, from_pil(pipe.render_each(each)), strict=True))
        if world > 1:
            import torch.distributed as dist

            gathered: list = [None] * world
            dist.all_gather_object(gathered, made)
            made = [item for part in gathered for item in part]
        return torch.stack([image for _, image in sorted(made, key=lambda item: item[0])])

    report = evaluate_folder(
        generate, encode_text, split, captions=captions, judge_steps=judge_steps, judge_cache=judge_cache,
        seed=seed, codec=None if pipe.codec.factor == 1 else pipe.codec, say=say,
    )  # fmt: skip
    settings = {"sampler": sampler or DEFAULT_SAMPLER, "steps": steps or DEFAULT_STEPS}
    settings["guidance"] = pipe.default_guidance if guidance is None else guidance
    split_said = {"held_out": held_out, "seed": split_seed, "train_images": len(split.train_captions)}
    split_said["held_out_images"] = len(split.held_captions)
    return {"model": pipe.name, "data": str(data), "split": split_said, "settings": settings, **report}


def chunked(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
