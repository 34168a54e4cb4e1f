"""ShapesEval: an exact, deterministic prompt-alignment benchmark in the spirit of GenEval (Ghosh et al.
2023), with plain image analysis instead of a downloaded detector as the judge.

The prompts come from the grammar of the built-in shapes data set (`unnoise.data.shapes`), in four
categories, each prompt with its ground truth (`PromptSpec`):

    single       "a small red circle in the top left"     colour and shape; size and position if stated
    two_objects  "a blue square to the left of a yellow triangle"   both objects, and the relation
    counting     "three green triangles"                  exactly that many (1 to 4)
    binding      "a red circle and a blue square"         each colour on the right shape

`check(image, spec)` finds the objects in an image: the background is the median of the border pixels;
each pixel is unmixed against every palette colour (the closest point on the segment from background to
colour gives its coverage `alpha` and a residual), pixels at least half covered by a palette colour are
object pixels; connected components per colour, without specks, are the objects. An object's shape is
the template (circle, square, upright triangle, with the object's area and centroid) that overlaps its
coverage map best; its position is the 3x3 grid cell of its centroid, its size small or large by area.
An image is correct when it shows exactly the objects the prompt names, nothing else, with the stated
size, position or relation. `evaluate` runs a generator over the prompt set and returns a `Report`.

The prompt set is fixed within a `PROMPTS_VERSION`: change how it is built, bump the version.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ..data.shapes import (
    BACKGROUNDS,
    COLOURS,
    JITTER,
    NUMBER_WORDS,
    PLACEMENT_TRIES,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPE_SCALE,
    SHAPES,
    SIZE_NAMES,
    SIZES,
    Relation,
    Scene,
    SceneKind,
    Shape,
    Size,
    cell_pairs,
    object_in_cell,
    position_name,
    relation_holds,
    valid_layout,
)
from ..errors import UnnoiseError
from ..settings import DEFAULT_SAMPLER, DEFAULT_STEPS

Category = Literal["single", "two_objects", "counting", "binding"]
CATEGORIES: tuple[Category, ...] = ("single", "two_objects", "counting", "binding")
SCENE_KIND: dict[Category, SceneKind] = {
    "single": "single",
    "two_objects": "relation",
    "counting": "count",
    "binding": "binding",
}

PROMPTS_VERSION = 1
PROMPTS_PER_CATEGORY = 24
PROMPTS_SEED = 20231017  # the seed the prompt set of this version is drawn with

# The judge, in fractions of the image width (or of its area) and in 0..255 RGB units.
MIN_ALPHA = 0.5  # a pixel belongs to an object when the object colour covers at least half of it
MAX_RESIDUAL = 60.0  # ... and it lies this close to the segment from the background to that colour
SPECK_AREA = 0.008  # components smaller than this (about a quarter of the smallest object) are noise
MIN_SHAPE_IOU = 0.6  # a component that matches no shape template this well is a blob, not an object
RELATION_CHECK_MARGIN = 0.1  # "A left of B": B's centroid this far right of A's, or more
SUPERSAMPLE = 4  # shape templates are rasterised this many times finer per axis

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (C, 3)
_COLOUR_NAMES = tuple(COLOURS)


# --- the prompt set ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedObject:
    """An object a prompt asks for; `size` and `position` are None when the prompt does not state them."""

    colour: str
    shape: Shape
    size: Size | None = None
    position: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and what must be true of an image for it. For a relation, objects[0] is the subject and
    objects[1] the reference: `relation` reads "objects[0] <relation> objects[1]"."""

    prompt: str
    category: Category
    objects: tuple[ExpectedObject, ...]
    relation: Relation | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun(obj: ExpectedObject) -> str:
    return _article(" ".join(w for w in (obj.size, obj.colour, obj.shape) if w))


def _single(rng: np.random.Generator, k: int) -> PromptSpec:
    """k % 4 picks what is stated beyond colour and shape: nothing, size, position, or both."""
    size = SIZE_NAMES[int(rng.integers(2))] if k % 4 in (1, 3) else None
    position = POSITIONS[int(rng.integers(9))] if k % 4 in (2, 3) else None
    obj = ExpectedObject(_COLOUR_NAMES[int(rng.integers(6))], SHAPES[int(rng.integers(3))], size, position)
    prompt = _noun(obj) + (" " + POSITION_PHRASES[position] if position else "")
    return PromptSpec(prompt, "single", (obj,))


def _two_objects(rng: np.random.Generator, k: int) -> PromptSpec:
    relation = RELATIONS[k % 4]
    pairs = [(c, s) for s in SHAPES for c in _COLOUR_NAMES]
    a, b = (ExpectedObject(*pairs[int(i)]) for i in rng.choice(len(pairs), 2, replace=False))
    return PromptSpec(f"{_noun(a)} {RELATION_PHRASES[relation]} {_noun(b)}", "two_objects", (a, b), relation)


def _counting(rng: np.random.Generator, k: int) -> PromptSpec:
    n = k % 4 + 1
    obj = ExpectedObject(_COLOUR_NAMES[int(rng.integers(6))], SHAPES[int(rng.integers(3))])
    prompt = f"{NUMBER_WORDS[n - 1]} {obj.colour} {obj.shape}{'s' if n > 1 else ''}"
    return PromptSpec(prompt, "counting", (obj,) * n)


def _binding(rng: np.random.Generator, k: int) -> PromptSpec:
    """Two objects, or three for one prompt in four; colours and shapes all distinct, as in the data set."""
    n = 3 if k % 4 == 3 else 2
    shapes = [SHAPES[int(i)] for i in rng.permutation(3)[:n]]
    colours = [_COLOUR_NAMES[int(i)] for i in rng.choice(6, n, replace=False)]
    objects = tuple(ExpectedObject(c, s) for c, s in zip(colours, shapes, strict=True))
    phrases = [_noun(o) for o in objects]
    return PromptSpec(", ".join(phrases[:-1]) + " and " + phrases[-1], "binding", objects)


_BUILDERS: dict[Category, Callable[[np.random.Generator, int], PromptSpec]] = {
    "single": _single,
    "two_objects": _two_objects,
    "counting": _counting,
    "binding": _binding,
}


def prompt_set(version: int = PROMPTS_VERSION) -> list[PromptSpec]:
    """The fixed prompt set: PROMPTS_PER_CATEGORY distinct prompts per category, in CATEGORIES order."""
    if version != PROMPTS_VERSION:
        raise UnnoiseError(f"this unnoise builds ShapesEval prompts version {PROMPTS_VERSION}, not {version}")
    specs: list[PromptSpec] = []
    for c, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([PROMPTS_SEED, c])
        seen: dict[str, PromptSpec] = {}
        while len(seen) < PROMPTS_PER_CATEGORY:
            spec = _BUILDERS[category](rng, len(seen))
            seen.setdefault(spec.prompt, spec)
        specs += seen.values()
    return specs


def first_prompts(prompts_per_category: int) -> list[PromptSpec]:
    """The first `prompts_per_category` prompts of each category, for a quick look."""
    if not 1 <= prompts_per_category <= PROMPTS_PER_CATEGORY:
        raise UnnoiseError(
            f"prompts per category must be in 1..{PROMPTS_PER_CATEGORY}, got {prompts_per_category}"
        )
    # prompt_set() lists each category's prompts in a run of PROMPTS_PER_CATEGORY
    return [s for k, s in enumerate(prompt_set()) if k % PROMPTS_PER_CATEGORY < prompts_per_category]


def reference_scene(
    spec: PromptSpec, resolution: int, *, seed: int = 0, background: str | None = None
) -> Scene:
    """A scene the shapes data set could draw for the prompt (the positive control): objects in random
    grid cells (the stated one, or a pair obeying the relation), stated sizes kept, the rest random."""
    rng = np.random.default_rng([PROMPTS_SEED, seed])
    background = background or list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    if spec.relation is not None:
        pairs = cell_pairs(spec.relation)
        cells = list(pairs[int(rng.integers(len(pairs)))])
    else:
        cells = [int(k) for k in rng.choice(9, len(spec.objects), replace=False)]
    cells = [
        POSITIONS.index(o.position) if o.position else k for o, k in zip(spec.objects, cells, strict=True)
    ]
    for attempt in range(2 * PLACEMENT_TRIES + 1):
        last = attempt == 2 * PLACEMENT_TRIES  # the data set's fallback: small objects at the cell centres
        objects = []
        for obj, cell in zip(spec.objects, cells, strict=True):
            size = obj.size or ("small" if attempt >= PLACEMENT_TRIES else SIZE_NAMES[int(rng.integers(2))])
            offset = (0.0, 0.0) if last else rng.uniform(-JITTER, JITTER, size=2)
            objects.append(object_in_cell(obj.shape, obj.colour, size, cell, offset))
        if valid_layout(objects, spec.relation):
            break
    mentioned = tuple(k for k in ("size", "position") if getattr(spec.objects[0], k) is not None)
    in_pixels = tuple(o.scaled(resolution) for o in objects)
    return Scene(SCENE_KIND[spec.category], background, in_pixels, resolution, spec.relation, mentioned)


# --- the judge ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedObject:
    """An object found in an image; `center` is the coverage-weighted centroid (x, y) in pixels."""

    colour: str
    shape: Shape | None  # None: a blob that matches no template
    size: Size
    position: str
    center: tuple[float, float]
    area: float  # in pixels, coverage-weighted
    shape_iou: float  # overlap with the best template


def _size_threshold() -> float:
    """Small/large boundary as a fraction of the image area: the geometric mean of the largest small
    and the smallest large object of the data set (circle pi r^2, square 4 r^2, triangle sqrt(3) r^2)."""
    unit_area = {"circle": math.pi, "square": 4.0, "triangle": math.sqrt(3)}
    areas = {s: [unit_area[k] * (SIZES[s] * SHAPE_SCALE[k]) ** 2 for k in SHAPES] for s in SIZE_NAMES}
    return math.sqrt(max(areas["small"]) * min(areas["large"]))


SIZE_THRESHOLD = _size_threshold()  # about 0.053 of the image area


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """Any PIL image or (H, W, 3) uint8/float array as float64 (H, W, 3) in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise UnnoiseError(f"expected an RGB image (H, W, 3), got an array of shape {array.shape}")
    return array.astype(np.float64) * (255.0 if array.dtype.kind == "f" and array.max() <= 1.0 else 1.0)


def _background(rgb: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (P, 3)
    return np.median(border, axis=0)


def _unmix(rgb: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage alpha (H, W, C) of each palette colour over the background, and the residual distance
    (H, W, C) of each pixel from the segment background -> colour."""
    d = _PALETTE - background  # (C, 3)
    p = rgb - background  # (H, W, 3)
    alpha = np.clip(p @ d.T / np.maximum((d * d).sum(-1), 1e-9), 0.0, 1.0)  # (H, W, C)
    residual = np.linalg.norm(p[..., None, :] - alpha[..., None] * d, axis=-1)  # (H, W, C)
    return alpha, residual


def _inside(shape: Shape, x: np.ndarray, y: np.ndarray, cx: float, cy: float, area: float) -> np.ndarray:
    """Whether points (x, y) fall in the upright `shape` of this area centred (by centroid) on (cx, cy)."""
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= area / math.pi
    if shape == "square":
        half = math.sqrt(area) / 2
        return (abs(x - cx) <= half) & (abs(y - cy) <= half)
    side = math.sqrt(4 * area / math.sqrt(3))
    height = math.sqrt(3) / 2 * side
    top = cy - 2 * height / 3
    return (y >= top) & (y <= top + height) & (abs(x - cx) <= (y - top) / height * side / 2)


def _template(shape: Shape, window: tuple[slice, slice], center, area: float) -> np.ndarray:
    """Pixel coverage (h, w) of the shape over a window of the image, by SUPERSAMPLE^2 points a pixel."""
    rows, cols = window
    s = SUPERSAMPLE
    ys = rows.start + (np.arange((rows.stop - rows.start) * s) + 0.5) / s
    xs = cols.start + (np.arange((cols.stop - cols.start) * s) + 0.5) / s
    fine = _inside(shape, xs[None, :], ys[:, None], *center, area)  # (h s, w s)
    return fine.reshape(len(ys) // s, s, len(xs) // s, s).mean(axis=(1, 3))  # (h, w)


def _describe(coverage: np.ndarray, colour: str, window: tuple[slice, slice], width: int, height: int):
    """The object whose coverage map (h, w) fills a window of the image."""
    area = float(coverage.sum())
    ys, xs = np.mgrid[window]
    center = (float((coverage * (xs + 0.5)).sum() / area), float((coverage * (ys + 0.5)).sum() / area))
    ious = {}
    for shape in SHAPES:
        t = _template(shape, window, center, area)
        ious[shape] = float(np.minimum(t, coverage).sum() / np.maximum(t, coverage).sum())
    best = max(ious, key=ious.get)
    shape = best if ious[best] >= MIN_SHAPE_IOU else None
    size: Size = "large" if area / (width * height) > SIZE_THRESHOLD else "small"
    position = position_name((center[0] / width, center[1] / height), 1.0)
    return DetectedObject(colour, shape, size, position, center, area, ious[best])


def detect(image: Image.Image | np.ndarray) -> list[DetectedObject]:
    """The objects in an image, sorted by colour then position (top to bottom, left to right)."""
    rgb = _as_rgb(image)  # (H, W, 3)
    height, width = rgb.shape[:2]
    alpha, residual = _unmix(rgb, _background(rgb))  # (H, W, C) each
    best = np.where(alpha > 0, residual, np.inf).argmin(-1)  # (H, W): the colour that explains it best
    score = np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # (H, W): its coverage
    fits = np.take_along_axis(residual, best[..., None], -1)[..., 0] <= MAX_RESIDUAL
    is_object = fits & (score >= MIN_ALPHA)
    found = []
    eight = np.ones((3, 3))  # 8-connectivity: a triangle's apex joins diagonally
    speck = SPECK_AREA * width * height
    for c, colour in enumerate(_COLOUR_NAMES):
        labels, _ = ndimage.label(is_object & (best == c), structure=eight)
        sizes = np.bincount(labels.ravel())
        for k, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
            if 2 * sizes[k] < speck:  # even with its rim it stays a speck
                continue
            pad = max(2, math.ceil(0.3 * math.sqrt(sizes[k])))
            window = (
                slice(max(rows.start - pad, 0), min(rows.stop + pad, height)),
                slice(max(cols.start - pad, 0), min(cols.stop + pad, width)),
            )
            # the component and its anti-aliased rim: one pixel around it, in this colour's coverage
            local = labels[window]
            grown = ndimage.binary_dilation(local == k, structure=eight) & ((local == k) | (local == 0))
            grown &= (best[window] == c) & fits[window]
            coverage = np.where(grown, score[window], 0.0)  # (h, w)
            if coverage.sum() >= speck:
                found.append(_describe(coverage, colour, window, width, height))
    return sorted(found, key=lambda o: (o.colour, o.center[1], o.center[0]))


def _matches(found: DetectedObject, expected: ExpectedObject) -> bool:
    return (
        found.colour == expected.colour
        and found.shape == expected.shape
        and expected.size in (None, found.size)
        and expected.position in (None, found.position)
    )


def check(image: Image.Image | np.ndarray, spec: PromptSpec) -> tuple[bool, dict[str, Any]]:
    """Whether the image shows exactly the objects the prompt names (colour bound to shape, count),
    nothing else, with the stated sizes, positions and relation. Details say what was found and why."""
    found = detect(image)
    width = _as_rgb(image).shape[1]
    wanted = Counter((o.colour, o.shape) for o in spec.objects)
    seen = Counter((o.colour, o.shape) for o in found)
    details: dict[str, Any] = {
        "found": [dataclasses.asdict(o) for o in found],
        "missing": sorted(f"{c} {s}" for c, s in (wanted - seen).elements()),
        "extra": sorted(f"{c} {s or 'blob'}" for c, s in (seen - wanted).elements()),
    }
    correct = wanted == seen
    if correct and spec.category == "single":
        details["attributes"] = _matches(found[0], spec.objects[0])
        correct = details["attributes"]
    if correct and spec.relation is not None:
        subject, reference = (
            next(f for f in found if (f.colour, f.shape) == (o.colour, o.shape)) for o in spec.objects
        )
        margin = RELATION_CHECK_MARGIN * width
        details["relation"] = relation_holds(spec.relation, subject.center, reference.center, margin=margin)
        correct = details["relation"]
    return correct, details


# --- running a benchmark --------------------------------------------------------------------------------


@dataclass
class PromptResult:
    spec: PromptSpec
    correct: list[bool]  # one per image
    details: list[dict[str, Any]]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


@dataclass
class Report:
    """Accuracy per category (correct images / images), overall as the mean of the categories."""

    results: list[PromptResult]
    samples_per_prompt: int
    prompts_version: int = PROMPTS_VERSION
    settings: dict[str, Any] = field(default_factory=dict)

    def categories(self) -> dict[str, dict[str, float]]:
        out = {}
        for category in CATEGORIES:
            marks = [c for r in self.results if r.spec.category == category for c in r.correct]
            if marks:
                out[category] = {
                    "accuracy": sum(marks) / len(marks),
                    "correct": sum(marks),
                    "total": len(marks),
                }
        return out

    @property
    def overall(self) -> float:
        accuracies = [c["accuracy"] for c in self.categories().values()]
        return sum(accuracies) / len(accuracies) if accuracies else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and numbers: ready for `json.dumps`."""
        return {
            "benchmark": "ShapesEval",
            "prompts_version": self.prompts_version,
            "samples_per_prompt": self.samples_per_prompt,
            "settings": self.settings,
            "overall": self.overall,
            "categories": self.categories(),
            "prompts": [
                {**r.spec.to_dict(), "accuracy": r.accuracy, "correct": r.correct, "details": r.details}
                for r in self.results
            ],
        }

    def table(self) -> str:
        rows = [f"{'category':<12} {'accuracy':>8} {'correct':>8} {'images':>7}"]
        for name, c in self.categories().items():
            rows.append(f"{name:<12} {c['accuracy']:>8.3f} {c['correct']:>8d} {c['total']:>7d}")
        return "\n".join([*rows, f"{'overall':<12} {self.overall:>8.3f}"])


Generate = Callable[[str, int, int], Sequence[Image.Image | np.ndarray]]


def evaluate(
    generate: Generate,
    prompts: Sequence[PromptSpec] | None = None,
    samples_per_prompt: int = 4,
    *,
    seed: int = 0,
    observe: Callable[[int, PromptSpec, list, list[bool]], None] | None = None,
    progress: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> Report:
    """Judge `generate(prompt, seed, n) -> n images` (image i from seed + i) on every prompt, same seeds.
    `observe(k, spec, images, correct)` sees each prompt's images and marks (to save them, say).

    shard (rank, world size): this process judges prompts k with k % world == rank, and the processes of a
    torchrun launch gather one report, the single process's (each prompt's images depend on it alone)."""
    from tqdm import tqdm

    if samples_per_prompt < 1:
        raise UnnoiseError(f"--samples (images per prompt) must be at least 1, got {samples_per_prompt}")
    rank, world = shard
    mine = []
    specs = prompt_set() if prompts is None else prompts
    ours = [(k, spec) for k, spec in enumerate(specs) if k % world == rank]
    for k, spec in tqdm(ours, unit="prompt", disable=not progress or rank != 0, leave=False):
        images = list(generate(spec.prompt, seed, samples_per_prompt))
        if len(images) != samples_per_prompt:
            raise UnnoiseError(f"asked for {samples_per_prompt} images of {spec.prompt!r}, got {len(images)}")
        marks = [check(image, spec) for image in images]
        mine.append((k, PromptResult(spec, [m[0] for m in marks], [m[1] for m in marks])))
        if observe is not None:
            observe(k, spec, images, [m[0] for m in marks])
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = [item for part in gathered for item in part]
    results = [result for _, result in sorted(mine, key=lambda item: item[0])]
    return Report(results, samples_per_prompt, settings={"seed": seed})


def torchrun_shard() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch (a gloo group, made once), or (0, 1) alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def run_shapes_eval(
    model_path: str | Path,
    *,
    samples_per_prompt: int = 4,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    guidance: float | None = None,  # None: the model's default (Pipeline.default_guidance)
    seed: int = 0,
    prompts_per_category: int = PROMPTS_PER_CATEGORY,
    device: str = "auto",
    save_images: str | Path | None = None,
    bind_attributes: bool | None = None,  # None: the model's default
    progress: bool = False,
) -> Report:
    """ShapesEval of a released model: every prompt (or the first `prompts_per_category` of each category,
    for a quick look), images seed, seed + 1, ... through `generate`. With `save_images`, each image is
    saved there as <category>/<prompt number>-<seed>-<pass|fail>.png, carrying its settings."""
    from ..pipeline import load

    chosen = first_prompts(prompts_per_category)  # named before the model loads
    shard = torchrun_shard()
    if shard[1] > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{shard[0] % torch.cuda.device_count()}"  # one GPU per process of the launch
    pipe = load(model_path, device=device)
    guidance = pipe.default_guidance if guidance is None else guidance
    bind_attributes = pipe.default_bind_attributes if bind_attributes is None else bind_attributes

    def generate(prompt: str, image_seed: int, n: int) -> list[Image.Image]:
        return pipe.generate(
            prompt, seed=image_seed, num_images=n, steps=steps, sampler=sampler, guidance=guidance,
            bind_attributes=bind_attributes,
        )  # fmt: skip

    observe = None
    if save_images is not None:
        from ..images import save_png

        def observe(k: int, spec: PromptSpec, images: list, correct: list[bool]) -> None:
            folder = Path(save_images) / spec.category
            folder.mkdir(parents=True, exist_ok=True)
            number = sum(1 for other in chosen[:k] if other.category == spec.category)  # within its category
            for i, (image, ok) in enumerate(zip(images, correct, strict=True)):
                save_png(image, folder / f"{number:02d}-{seed + i}-{'pass' if ok else 'fail'}.png")

    report = evaluate(
        generate, chosen, samples_per_prompt, seed=seed, observe=observe, progress=progress, shard=shard
    )
    report.settings.update(
        model=str(model_path),
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        prompts_per_category=prompts_per_category,
        bind_attributes=bind_attributes,
    )
    return report
