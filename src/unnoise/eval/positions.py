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
