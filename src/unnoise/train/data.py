"""Training data by global sample position: the position alone decides which image, noise and dropout.

Step s of a run with global batch G uses positions s*G ... s*G + G - 1, split over processes and
micro-batches. A position picks its example (shapes: the position itself; a folder: a fresh permutation
each epoch) and seeds its own generator for sigma, noise, caption dropout and flips. So a resumed run
sees exactly the batches an uninterrupted one would, and N processes see what one process would.
"""

from __future__ import annotations

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
    """A folder of captioned images, reshuffled each epoch by a permutation seeded with (seed, epoch)."""

    def __init__(self, root: str, resolution: int, seed: int, background: str, caption_column: str = "text"):
        from ..data.folder import ImageFolderDataset

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
        self.captions = self.dataset.captions
        self.description = f"{root}: {self.dataset.report.summary()}"
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._permutations = {epoch: torch.randperm(len(self.dataset), generator=generator)}
        return self._permutations[epoch]

    def examples(self, positions: list[int]) -> tuple[torch.Tensor, list[str]]:
        n = len(self.dataset)
        items = [self.dataset[int(self._permutation(p // n)[p % n])] for p in positions]
        return torch.stack([image for image, _ in items]), [caption for _, caption in items]


def open_source(
    data: str, resolution: int, seed: int, background: str, caption_column: str = "text", shapes_mix: str = ""
):
    if data == "shapes":
        return ShapesSource(resolution, seed, shapes_mix)
    if not Path(data).exists():
        raise UnnoiseError(f"--data {data!r}: no such folder (use 'shapes' for the built-in data set)")
    return FolderSource(data, resolution, seed, background, caption_column)


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
            images[k] = images[k].flip(-1)
            if masks is not None:
                masks[k] = {word: m.flip(-1) for word, m in masks[k].items()}
    return Batch(images, captions, torch.cat(sigmas), torch.stack(noises), masks)
