"""Training data by global sample position: the position alone decides which image, noise and dropout.

Step s of a run with global batch G uses positions s*G ... s*G + G - 1, split over processes and
micro-batches. A position picks its example (shapes: the position itself; a folder: a fresh permutation
each epoch) and seeds its own generator for sigma, noise, caption dropout and flips. So a resumed run
sees exactly the batches an uninterrupted one would, and N processes see what one process would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import ImageColor

from ..errors import UnnoiseError

if TYPE_CHECKING:
    from ..data.shapes import GroundedWords


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    captions: list[str]  # after dropout: "" for the dropped ones
    sigma: torch.Tensor  # (B,)
    noise: torch.Tensor  # (B, 3, R, R)
    # with --grounding-weight: per image, where each grounded word of its caption is (colour and shape,
    # and the words --ground-places and --ground-numbers add), word -> (R, R) coverage (see
    # data.shapes.word_masks); empty for a dropped caption
    word_masks: list[dict[str, torch.Tensor]] | None = None

    def pin_memory(self) -> Batch:
        """Page-locked copies, so the copies to the GPU can overlap compute (DataLoader's pin_memory)."""
        return Batch(
            self.images.pin_memory(), self.captions, self.sigma.pin_memory(), self.noise.pin_memory(),
            self.word_masks,
        )  # fmt: skip


class ShapesSource:
    """The built-in procedural shapes: position p is example p."""

    def __init__(self, resolution: int, seed: int, mix: str = ""):
        from ..data.shapes import CaptionMix, ShapesDataset

        self.dataset = ShapesDataset(resolution=resolution, seed=seed, mix=CaptionMix.parse(mix))
        self.captions: list[str] | None = None  # unbounded: captions are encoded as they come
        mixed = f", caption mix {self.dataset.mix.describe()}" if self.dataset.mix.describe() else ""
        self.description = f"built-in shapes at {resolution}x{resolution} (procedural, unbounded{mixed})"

    def examples(self, positions: list[int]) -> tuple[torch.Tensor, list[str]]:
        return self.dataset.batch(positions)

    def mirrored(self, example: torch.Tensor, position: int) -> torch.Tensor:
        return example.flip(-1)

    def grounded_examples(
        self, positions: list[int], words: GroundedWords
    ) -> tuple[torch.Tensor, list[str], list[dict[str, torch.Tensor]]]:
        """`examples`, and where each of the `words` of each caption is (data.shapes.word_masks), from
        one pass."""
        from ..data.shapes import to_tensor, word_masks

        samples = [self.dataset[p] for p in positions]
        images = to_tensor(np.stack([s.image for s in samples]))  # (B, 3, H, W)
        masks = [word_masks(s.scene, supersample=self.dataset.supersample, words=words) for s in samples]
        tensors = [{word: torch.from_numpy(m) for word, m in each.items()} for each in masks]
        return images, [s.caption for s in samples], tensors


class FolderSource:
    """A folder of captioned images, reshuffled each epoch by a permutation seeded with (seed, epoch); with
    `held_out`, the concepts of that fraction (data.split, seeded by `split_seed`) are left out."""

    def __init__(
        self,
        root: str,
        resolution: int,
        seed: int,
        background: str,
        caption_column: str = "text",
        held_out: float = 0.0,
        split_seed: int = 0,
    ):
        from ..data.folder import ImageFolderDataset
        from ..data.split import held_out_mask

        try:
            rgb = ImageColor.getrgb(background)[:3]
        except ValueError:
            raise UnnoiseError(
                f"--background {background!r} is not a colour (try '#ffffff' or 'white')"
            ) from None
        self.dataset = ImageFolderDataset(
            root, resolution=resolution, background=rgb, caption_column=caption_column
        )
        self.seed = seed
        held = held_out_mask(self.dataset.captions, held_out, split_seed) if held_out else []
        self.indices = [i for i in range(len(self.dataset)) if not (held and held[i])]  # the training items
        if not self.indices:
            raise UnnoiseError(f"every concept of {root} fell in the held-out split: lower --held-out")
        self.captions = [self.dataset.captions[i] for i in self.indices]
        left_out = f"; {len(self.dataset) - len(self.indices)} held out ({held_out:.0%} of the concepts)"
        self.description = f"{root}: {self.dataset.report.summary()}{left_out if held_out else ''}"
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._permutations = {epoch: torch.randperm(len(self.indices), generator=generator)}
        return self._permutations[epoch]

    def held_out_indices(self) -> list[int]:
        """The data set indices of the held-out images (the validation loss's), in folder order."""
        training = set(self.indices)
        return [i for i in range(len(self.dataset)) if i not in training]

    def index(self, position: int) -> int:
        """The data set index of the example at a global sample position."""
        n = len(self.indices)
        return self.indices[int(self._permutation(position // n)[position % n])]

    def examples(self, positions: list[int]) -> tuple[torch.Tensor, list[str]]:
        items = [self.dataset[self.index(p)] for p in positions]
        return torch.stack([image for image, _ in items]), [caption for _, caption in items]

    def mirrored(self, example: torch.Tensor, position: int) -> torch.Tensor:
        """The example at `position` flipped left to right."""
        return example.flip(-1)


class LatentSource:
    """A folder's images as a codec's latents, encoded once (with their mirror images when flips are asked
    for, since a flipped latent is not the latent of the flipped image) and cached in the run folder."""

    def __init__(self, folder: FolderSource, codec, cache: Path, *, flip: bool, log=print):
        self.folder, self.captions = folder, folder.captions
        self.latents, self.mirrors = encoded_folder(folder, codec, cache, flip=flip, log=log)
        c, h, w = self.latents.shape[1:]
        self.description = f"{folder.description}; as {c}x{h}x{w} latents of {codec.name}"
        self.dataset, self.held_out_indices = folder.dataset, folder.held_out_indices  # the validation's

    def examples(self, positions: list[int]) -> tuple[torch.Tensor, list[str]]:
        indices = [self.folder.index(p) for p in positions]
        return self.latents[indices].float(), [self.folder.dataset.captions[i] for i in indices]

    def mirrored(self, example: torch.Tensor, position: int) -> torch.Tensor:
        return self.mirrors[self.folder.index(position)].float()


def encoded_folder(folder: FolderSource, codec, cache: Path, *, flip: bool, log=print):
    """(latents (N, c, h, w), mirror images' latents or None) of every image of the folder, from `cache`
    when it was made from the same images by the same codec; a damaged or stale cache is made again."""
    import hashlib

    from ..release import CorruptCheckpointError, load_tensors, save_tensors

    pixels = folder.dataset.pixels  # (N, 3, R, R) uint8
    key = hashlib.sha256(pixels.numpy().tobytes())
    key.update(f"{codec.name}:{codec.fingerprint}:{flip}".encode())
    key = key.hexdigest()
    if cache.is_file():
        try:
            tensors = load_tensors(cache)
            if tensors.get("key") is not None and bytes(tensors["key"].tolist()).decode() == key:
                return tensors["latents"], tensors.get("mirrors")
            log(f"{cache} was made from other images or another autoencoder: encoding again")
        except (CorruptCheckpointError, UnicodeDecodeError, ValueError) as error:
            log(f"{cache} is damaged ({error}): encoding again")
    log(f"encoding {len(pixels)} images with {codec.name}{' and their mirror images' if flip else ''} (once)")
    latents, mirrors = encode_all(codec, pixels, False), encode_all(codec, pixels, True) if flip else None
    tensors = {"latents": latents, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}
    if mirrors is not None:
        tensors["mirrors"] = mirrors
    tmp = cache.with_name(f".tmp-{os.getpid()}-{cache.name}")  # each process of a launch its own
    save_tensors(tensors, tmp)
    tmp.replace(cache)  # a killed write leaves a temporary, never a half cache under the real name
    return latents, mirrors


@torch.no_grad()
def encode_all(codec, pixels: torch.Tensor, mirror: bool, batch: int = 256) -> torch.Tensor:
    """Latents (N, c, h, w) in bf16 of uint8 pixels (N, 3, R, R), mirrored first if asked."""
    from ..data.folder import to_unit_range

    out = []
    for chunk in pixels.split(batch):
        x = to_unit_range(chunk)
        out.append(codec.encode(x.flip(-1) if mirror else x).to(torch.bfloat16))
    return torch.cat(out)


def open_source(
    data: str,
    resolution: int,
    seed: int,
    background: str,
    caption_column: str = "text",
    shapes_mix: str = "",
    held_out: float = 0.0,
):
    if data == "shapes":
        return ShapesSource(resolution, seed, shapes_mix)
    if not Path(data).exists():
        raise UnnoiseError(f"--data {data!r}: no such folder (use 'shapes' for the built-in data set)")
    return FolderSource(data, resolution, seed, background, caption_column, held_out=held_out)


class MixedSource:
    """Two sources in one stream: each sample position draws from `extra` with probability `fraction`
    (decided by the position alone, so a batch does not depend on the workers that make it), else from
    `main`: a fine-tune's folder with the data its model learned from mixed in (kohya's regularization
    images, DreamBooth's prior preservation), so that it keeps what it knew."""

    def __init__(self, main, extra, fraction: float, seed: int):
        self.main, self.extra, self.fraction, self.seed = main, extra, fraction, seed
        self.captions = main.captions  # the extra's are encoded as they come
        self.description = f"{main.description}; {fraction:.0%} of each batch from {extra.description}"
        self.dataset = getattr(main, "dataset", None)
        self.held_out_indices = getattr(main, "held_out_indices", list)

    def from_extra(self, position: int) -> bool:
        generator = torch.Generator().manual_seed((self.seed + 7) * 998_244_353 + position)
        return torch.rand(1, generator=generator).item() < self.fraction

    def examples(self, positions: list[int]) -> tuple[torch.Tensor, list[str]]:
        chosen = [self.from_extra(p) for p in positions]
        parts = {}
        for flag, source in ((False, self.main), (True, self.extra)):
            mine = [p for p, c in zip(positions, chosen, strict=True) if c == flag]
            if mine:
                some_images, some_captions = source.examples(mine)
                parts[flag] = (iter(some_images), iter(some_captions))
        images, captions = [], []
        for flag in chosen:
            images.append(next(parts[flag][0]))
            captions.append(next(parts[flag][1]))
        return torch.stack(images), captions

    def mirrored(self, example: torch.Tensor, position: int) -> torch.Tensor:
        source = self.extra if self.from_extra(position) else self.main
        return source.mirrored(example, position)


def position_generator(seed: int, position: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed + 1) * 1_000_000_007 + position)


def make_batch(
    source,
    positions: list[int],
    *,
    formulation,
    seed: int,
    cond_dropout: float,
    flip: bool,
    grounding: GroundedWords | None = None,
) -> Batch:
    """The examples at `positions` with each one's own sigma, noise, dropout and flip; with `grounding`,
    where those words of their captions are (a source that knows, such as the built-in shapes)."""
    if grounding is not None:
        images, captions, masks = source.grounded_examples(positions, grounding)
    else:
        (images, captions), masks = source.examples(positions), None
    sigmas, noises = [], []
    for k, position in enumerate(positions):
        generator = position_generator(seed, position)
        sigmas.append(formulation.sample_sigma(1, generator))
        noises.append(torch.randn(images.shape[1:], generator=generator))
        if torch.rand(1, generator=generator).item() < cond_dropout:
            captions[k] = ""
            if masks is not None:
                masks[k] = {}
        if flip and torch.rand(1, generator=generator).item() < 0.5:
            images[k] = source.mirrored(images[k], position)
            if masks is not None:
                masks[k] = {word: m.flip(-1) for word, m in masks[k].items()}
    return Batch(images, captions, torch.cat(sigmas), torch.stack(noises), masks)
