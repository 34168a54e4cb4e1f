"""InpaintEval: does inpainting a masked object with a prompt naming a new colour or shape give that colour
or shape, and does every pixel outside the mask stay as it was?

Each trial is a one-object image drawn by the shapes data set (`reference_scene`), a mask covering the
object's bounding box and a margin, and a prompt that changes one attribute: "a blue circle" for a red
circle (colour), "a red square" for it (shape). The edited image is judged by ShapesEval's `check`: it
must show exactly one object, of the prompt's colour and shape. Since the original object lies inside
the mask and the pixels outside are the input's, that object can only have come from the masked region.
Pixels changed outside the mask are counted separately, over every image.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from ..data.shapes import COLOURS, POSITION_PHRASES, SHAPES, Scene, render
from ..errors import UnnoiseError
from ..settings import DEFAULT_SAMPLER, DEFAULT_STEPS
from .shapes_eval import ExpectedObject, PromptSpec, _noun, check, reference_scene

MASK_MARGIN = 3  # pixels around the object's bounding box, so a new shape has room
Change = Literal["colour", "shape"]
Editor = Callable[
    [Image.Image, Image.Image, str, int, int], list[Image.Image]
]  # (image, mask, prompt, seed, n)


@dataclass(frozen=True)
class InpaintTrial:
    scene: Scene  # the input image's ground truth: one object
    change: Change
    target: PromptSpec  # the prompt, and what the edited image must show

    def image(self) -> Image.Image:
        return Image.fromarray(render(self.scene))

    def mask(self) -> Image.Image:
        """White over the object's bounding box plus MASK_MARGIN pixels, black elsewhere."""
        left, top, right, bottom = self.scene.objects[0].bounding_box()
        r = self.scene.resolution
        box = [max(0, int(left) - MASK_MARGIN), max(0, int(top) - MASK_MARGIN)]
        box += [min(r - 1, int(right) + MASK_MARGIN), min(r - 1, int(bottom) + MASK_MARGIN)]
        mask = Image.new("L", (r, r), 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        return mask


def inpaint_trials(resolution: int) -> list[InpaintTrial]:
    """Every colour x shape as the original object, each edited once in colour and once in shape: 36 trials.

    The new colour or shape is the next one in the palette's (or shapes') order, so every pair occurs."""
    trials = []
    colours = list(COLOURS)
    for k, (colour, shape) in enumerate(itertools.product(colours, SHAPES)):
        original = PromptSpec(
            _noun(ExpectedObject(colour, shape)), "single", (ExpectedObject(colour, shape),)
        )
        scene = reference_scene(original, resolution, seed=k)
        new_colour = colours[(colours.index(colour) + 1 + k % (len(colours) - 1)) % len(colours)]
        new_shape = SHAPES[(SHAPES.index(shape) + 1 + k % 2) % len(SHAPES)]
        where = scene.objects[0].position_name
        for change, target in (("colour", (new_colour, shape)), ("shape", (colour, new_shape))):
            expected = ExpectedObject(*target)
            prompt = f"{_noun(expected)} {POSITION_PHRASES[where]}"  # the mask's place, said in words too
            trials.append(InpaintTrial(scene, change, PromptSpec(prompt, "single", (expected,))))
    return trials


def changed_outside(edited: Image.Image, original: Image.Image, mask: Image.Image) -> int:
    """Pixels (not channels) outside the mask whose value differs from the original's."""
    outside = np.asarray(mask.convert("L")) == 0
    differs = (np.asarray(edited.convert("RGB")) != np.asarray(original.convert("RGB"))).any(-1)
    return int((differs & outside).sum())


Observer = Callable[[int, InpaintTrial, int, Image.Image, bool], None]


def evaluate_inpainting(
    edit: Editor,
    trials: Sequence[InpaintTrial],
    samples: int = 2,
    *,
    seed: int = 0,
    observe: Observer | None = None,
) -> dict[str, Any]:
    """Run `edit(image, mask, prompt, seed, n)` on every trial and judge it; a JSON-ready report.
    `observe(trial number, trial, seed, edited image, correct)` sees each judged image."""
    if samples < 1:
        raise UnnoiseError(f"--samples must be at least 1, got {samples}")
    rows = []
    for t, trial in enumerate(trials):
        image, mask = trial.image(), trial.mask()
        for k, edited in enumerate(edit(image, mask, trial.target.prompt, seed, samples)):
            correct, details = check(edited, trial.target)
            if observe is not None:
                observe(t, trial, seed + k, edited, bool(correct))
            rows.append(
                {
                    "prompt": trial.target.prompt,
                    "change": trial.change,
                    "seed": seed + k,
                    "correct": bool(correct),
                    "changed_outside_mask": changed_outside(edited, image, mask),
                    "found": [f"{o['colour']} {o['shape'] or 'blob'}" for o in details["found"]],
                }
            )
    by_change = {
        change: float(np.mean([r["correct"] for r in rows if r["change"] == change]))
        for change in ("colour", "shape")
    }
    return {
        "success": float(np.mean([r["correct"] for r in rows])),
        "by_change": by_change,
        "images": len(rows),
        "pixels_changed_outside_masks": sum(r["changed_outside_mask"] for r in rows),
        "results": rows,
    }


def run_inpaint_eval(
    model_path: str | Path,
    *,
    samples: int = 2,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    guidance: float | None = None,  # None: the model's default (Pipeline.default_guidance)
    jump: int | None = None,  # None: the pipeline's defaults (RePaint on)
    resample: int | None = None,
    area: str = "whole",
    seed: int = 0,
    device: str = "auto",
    save_images: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """InpaintEval of a released model. With `save_images`, each inpainted image is saved there as
    <colour|shape>/<trial number>-<seed>-<pass|fail>.png, carrying its settings."""
    from tqdm import tqdm

    from ..pipeline import load
    from ..settings import REPAINT_JUMP, REPAINT_RESAMPLE

    pipe = load(model_path, device=device)
    guidance = pipe.default_guidance if guidance is None else guidance
    jump = REPAINT_JUMP if jump is None else jump
    resample = REPAINT_RESAMPLE if resample is None else resample

    trials = inpaint_trials(pipe.resolution)
    bar = tqdm(total=len(trials), unit="trial", disable=not progress, leave=False)

    def edit(image: Image.Image, mask: Image.Image, prompt: str, image_seed: int, n: int):
        bar.update(1)
        return pipe.inpaint(
            image, mask, prompt, seed=image_seed, num_images=n, steps=steps, sampler=sampler,
            guidance=guidance, jump=jump, resample=resample, area=area,
        )  # fmt: skip

    with bar:
        report = evaluate_inpainting(edit, trials, samples, seed=seed, observe=saver(save_images))
    report["settings"] = dict(
        model=str(model_path), samples=samples, sampler=sampler, steps=steps, guidance=guidance,
        jump=jump, resample=resample, area=area, seed=seed,
    )  # fmt: skip
    return report


def saver(folder: str | Path | None) -> Observer | None:
    """An observer that saves each judged image under `folder` (None: no observer)."""
    if folder is None:
        return None
    from ..images import save_png

    def save(t: int, trial: InpaintTrial, image_seed: int, image: Image.Image, correct: bool) -> None:
        where = Path(folder) / trial.change
        where.mkdir(parents=True, exist_ok=True)
        save_png(image, where / f"{t:02d}-{image_seed}-{'pass' if correct else 'fail'}.png")

    return save


def table(report: dict[str, Any]) -> str:
    lines = [f"{'change':<8} {'success':>8}"]
    lines += [f"{change:<8} {value:>8.3f}" for change, value in report["by_change"].items()]
    lines.append(f"{'overall':<8} {report['success']:>8.3f}   ({report['images']} images)")
    lines.append(f"pixels changed outside the masks: {report['pixels_changed_outside_masks']}")
    return "\n".join(lines)
