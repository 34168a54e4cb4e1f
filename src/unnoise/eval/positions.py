"""Where a model puts one object when the prompt says where: the position confusion matrix.

For each of the 9 cells of the shapes grid, prompts "a <colour> <shape> <position phrase>" (colours and
shapes rotating over the cells) and images from seeds 0, 1, ...; ShapesEval's judge (`detect`) finds the
objects. An image with exactly one object of the prompt's colour and nothing else gives that object's
cell; any other image counts as "other" (none, several, or the wrong colour). The horizontal accuracy is
the fraction of images whose column is the stated one, the vertical accuracy likewise for rows: images
counted as "other" are wrong in both. Issue 11 found the shipped model's rows followed the text and its
columns did not; this measures each axis on its own.

Early in training a model often draws extra objects or none; `placement` is the gentler reading for such
models: the cell of the largest object of the prompt's colour, whatever else the image holds (wrong only
when there is no object of that colour).

`position_word_test` asks the same question without sampling, in seconds: does the denoiser reconstruct
a training image better from its true caption ("... in the top left") than from the caption with the
position word mirrored ("... in the top right")? A model that ignores the word is indifferent (50%).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.shapes import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, ShapesDataset
from .shapes_eval import detect

COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
OTHER = "other"


def cell_prompt(cell: int) -> tuple[str, str]:
    """(prompt, colour) for grid cell 0..8: colours and shapes rotate so each cell gets a different pair."""
    colour = list(COLOURS)[cell % len(COLOURS)]
    shape = SHAPES[cell % len(SHAPES)]
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} {POSITION_PHRASES[POSITIONS[cell]]}", colour


def found_cells(image: Image.Image | np.ndarray, colour: str) -> tuple[int | None, int | None]:
    """(the cell of the image's only object when it has exactly one and it has `colour`, else None;
    the cell of its largest object of `colour`, None when it has none)."""
    objects = detect(image)
    only = POSITIONS.index(objects[0].position) if len(objects) == 1 and objects[0].colour == colour else None
    coloured = [o for o in objects if o.colour == colour]
    largest = POSITIONS.index(max(coloured, key=lambda o: o.area).position) if coloured else None
    return only, largest


@dataclass
class PositionReport:
    """Counts of (stated, found) columns and rows; index 3 of `found` is "other"."""

    columns: np.ndarray = field(default_factory=lambda: np.zeros((3, 4), dtype=int))  # (stated, found)
    rows: np.ndarray = field(default_factory=lambda: np.zeros((3, 4), dtype=int))
    placed_columns: np.ndarray = field(default_factory=lambda: np.zeros((3, 4), dtype=int))  # largest object
    placed_rows: np.ndarray = field(default_factory=lambda: np.zeros((3, 4), dtype=int))
    images: int = 0

    def add(self, stated: int, found: int | None, largest: int | None = None) -> None:
        row, col = divmod(stated, 3)
        for (columns, rows), cell in (
            ((self.columns, self.rows), found),
            ((self.placed_columns, self.placed_rows), largest),
        ):
            found_row, found_col = (3, 3) if cell is None else divmod(cell, 3)
            columns[col, found_col] += 1
            rows[row, found_row] += 1
        self.images += 1

    @property
    def horizontal(self) -> float:
        return float(np.trace(self.columns[:, :3]) / max(1, self.images))

    @property
    def vertical(self) -> float:
        return float(np.trace(self.rows[:, :3]) / max(1, self.images))

    @property
    def placement(self) -> tuple[float, float]:
        """(horizontal, vertical) accuracy of the largest object of the prompt's colour."""
        n = max(1, self.images)
        return float(np.trace(self.placed_columns[:, :3]) / n), float(np.trace(self.placed_rows[:, :3]) / n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "horizontal": self.horizontal,
            "vertical": self.vertical,
            "columns": self.columns.tolist(),
            "rows": self.rows.tolist(),
            "placement_horizontal": self.placement[0],
            "placement_vertical": self.placement[1],
            "placed_columns": self.placed_columns.tolist(),
            "placed_rows": self.placed_rows.tolist(),
        }

    def table(self) -> str:
        """Both confusion matrices as Markdown: stated position down, found across."""
        lines = [
            f"exactly one object: horizontal {self.horizontal:.0%}, vertical {self.vertical:.0%};"
            f" largest object of the colour: horizontal {self.placement[0]:.0%},"
            f" vertical {self.placement[1]:.0%}",
            "",
        ]
        for title, names, counts in (("column", COLUMNS, self.columns), ("row", ROWS, self.rows)):
            lines += [
                f"| stated {title} \\ found | {' | '.join((*names, OTHER))} |",
                "|---|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {name} | {' | '.join(str(int(v)) for v in counts[k])} |" for k, name in enumerate(names)
            ]
            lines.append("")
        return "\n".join(lines)


Generate = Callable[[str, int, int], Sequence[Image.Image | np.ndarray]]


def evaluate_positions(generate: Generate, samples_per_cell: int = 8, *, seed: int = 0) -> PositionReport:
    """Judge `generate(prompt, seed, n) -> n images` (image i from seed + i) on one prompt per cell."""
    report = PositionReport()
    for cell in range(9):
        prompt, colour = cell_prompt(cell)
        for image in generate(prompt, seed, samples_per_cell):
            report.add(cell, *found_cells(image, colour))
    return report


# --- the position-word test: no sampling, only denoising ----------------------------------------------

MIRRORED_WORDS = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
PROBE_SIGMAS = (0.5, 1.0, 2.0, 4.0)


def mirrored(caption: str, axis: str) -> str:
    """The caption with its position word on `axis` swapped: "in the top left" -> "in the top right"."""
    a, b = MIRRORED_WORDS[axis]
    return " ".join({a: b, b: a}.get(word, word) for word in caption.split(" "))


def probe_samples(resolution: int, axis: str, count: int, seed: int = 1000) -> list:
    """Single-object samples of the shapes data whose caption names a position off the middle of `axis`
    (so the mirrored caption names another cell)."""
    data, chosen = ShapesDataset(resolution=resolution, seed=seed), []
    a, b = MIRRORED_WORDS[axis]
    for sample in data:
        words = sample.caption.split(" ")
        if (
            sample.scene.kind == "single"
            and "position" in sample.scene.mentioned
            and (a in words or b in words)
        ):
            chosen.append(sample)
            if len(chosen) == count:
                return chosen
    raise AssertionError("the shapes data set is unbounded")


@torch.no_grad()
def paired_noise_errors(pipe, x0: torch.Tensor, conditions: dict, sigma: float, generator) -> dict:
    """Each sample's mean squared denoising error (N,) at `sigma` under each named condition, every
    condition seeing the same noise, so only the condition differs. x0 (N, C, H, W)."""
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    x = x0 + sigma * noise
    s = torch.full((len(x0),), float(sigma), device=x0.device)
    return {name: ((pipe.denoiser(x, s, c) - x0) ** 2).flatten(1).mean(1) for name, c in conditions.items()}


def compare(true_errors: torch.Tensor, other_errors: torch.Tensor) -> dict[str, float]:
    """How often the true condition denoises better (`preferred`, a tie counts half, chance 0.5), and how
    much larger the other condition's mean error is (`gap`, relative)."""
    wins = (true_errors < other_errors).float() + 0.5 * (true_errors == other_errors).float()
    return {"preferred": float(wins.mean()), "gap": float(other_errors.mean() / true_errors.mean() - 1)}


@torch.no_grad()
def position_word_test(pipe, samples: int = 64, sigmas=PROBE_SIGMAS, seed: int = 0) -> dict[str, dict]:
    """Per axis and noise level: `compare` of the true caption against the one with its position word
    mirrored, on training images of single objects whose captions name a position off the middle."""
    results: dict[str, dict] = {}
    generator = torch.Generator().manual_seed(seed)
    for axis in MIRRORED_WORDS:
        chosen = probe_samples(pipe.resolution, axis, samples)
        x0 = torch.stack([s.tensor() for s in chosen]).to(pipe.device)  # (N, 3, R, R)
        conditions = {
            "true": pipe.text.encode([s.caption for s in chosen]).to(pipe.device),
            "mirrored": pipe.text.encode([mirrored(s.caption, axis) for s in chosen]).to(pipe.device),
        }
        by_sigma = {}
        for sigma in sigmas:
            errors = paired_noise_errors(pipe, x0, conditions, sigma, generator)
            by_sigma[str(sigma)] = compare(errors["true"], errors["mirrored"])
        results[axis] = by_sigma
    return results
