"""Where a model puts one object when the prompt says where: the position confusion matrix.

For each of the 9 cells of the shapes grid, prompts "a <colour> <shape> <position phrase>" (colours and
shapes rotating over the cells) and images from seeds 0, 1, ...; ShapesEval's judge (`detect`) finds the
objects. An image with exactly one object of the prompt's colour and nothing else gives that object's
cell; any other image counts as "other" (none, several, or the wrong colour). The horizontal accuracy is
the fraction of images whose column is the stated one, the vertical accuracy likewise for rows: images
counted as "other" are wrong in both. Issue 11 found the shipped model's rows followed the text and its
columns did not; this measures each axis on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ..data.shapes import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES
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


def found_cell(image: Image.Image | np.ndarray, colour: str) -> int | None:
    """The cell of the image's only object when it has exactly one and it has `colour`, else None."""
    objects = detect(image)
    if len(objects) != 1 or objects[0].colour != colour:
        return None
    return POSITIONS.index(objects[0].position)


@dataclass
class PositionReport:
    """Counts of (stated, found) columns and rows; index 3 of `found` is "other"."""

    columns: np.ndarray = field(default_factory=lambda: np.zeros((3, 4), dtype=int))  # (stated, found)
    rows: np.ndarray = field(default_factory=lambda: np.zeros((3, 4), dtype=int))
    images: int = 0

    def add(self, stated: int, found: int | None) -> None:
        row, col = divmod(stated, 3)
        found_row, found_col = (3, 3) if found is None else divmod(found, 3)
        self.columns[col, found_col] += 1
        self.rows[row, found_row] += 1
        self.images += 1

    @property
    def horizontal(self) -> float:
        return float(np.trace(self.columns[:, :3]) / max(1, self.images))

    @property
    def vertical(self) -> float:
        return float(np.trace(self.rows[:, :3]) / max(1, self.images))

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "horizontal": self.horizontal,
            "vertical": self.vertical,
            "columns": self.columns.tolist(),
            "rows": self.rows.tolist(),
        }

    def table(self) -> str:
        """Both confusion matrices as Markdown: stated position down, found across."""
        lines = []
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
            report.add(cell, found_cell(image, colour))
    return report
