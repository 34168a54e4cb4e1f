"""A built-in data set of captioned images: coloured shapes on plain backgrounds, generated on demand.

Sample i depends only on (seed, i): `np.random.default_rng([seed, i])` draws it, so any index can be
made in any order by any worker or rank, and the data set has no end. A sample is a `Scene` (the
ground truth), a caption that is true of it, and the image, drawn with Pillow at 4x and box-filtered
down for anti-aliased edges.

Scene kinds, drawn with the weights of a `CaptionMix` (the default: 0.3, 0.25, 0.25, 0.2):

    single    "a small red circle in the top left", "a blue square"  (size and position optional)
    relation  "a blue square to the left of a yellow triangle"       (holds by centroids, with a margin)
    count     "three green triangles"                                (1 to 4 identical objects)
    binding   "a red circle and a blue square"                       (2 or 3, distinct colours and shapes)

Objects sit in the cells of a 3x3 grid, whose names are the positions ("top left", ..., "center", ...),
one object per cell, and never touch. Geometry is drawn in fractions of the image width, so a
(seed, i) pair is the same scene at every resolution; the ground truth is reported in pixels, with
(0, 0) the top-left corner of the image and y pointing down. Objects are at least 6 px across at
32x32. Object colours are saturated and backgrounds neutral greys, so saturation alone tells an
object's pixel from the background.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import UnnoiseError

Shape = Literal["circle", "square", "triangle"]
Size = Literal["small", "large"]
SceneKind = Literal["single", "relation", "count", "binding"]
Relation = Literal["left of", "right of", "above", "below"]
RGB = tuple[int, int, int]

SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle")
SIZE_NAMES: tuple[Size, ...] = ("small", "large")
RELATIONS: tuple[Relation, ...] = ("left of", "right of", "above", "below")

COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 40),
    "purple": (145, 60, 190),
    "orange": (250, 140, 30),
}
BACKGROUNDS: dict[str, RGB] = {
    "white": (245, 245, 245),
    "light grey": (200, 200, 200),
    "dark grey": (60, 60, 60),
    "black": (15, 15, 15),
}

# A size's nominal radius as a fraction of the image width, times a per-shape factor that makes the
# areas alike (circle pi r^2, square 3.24 r^2, triangle 2.93 r^2). An object's `radius` is half its width.
SIZES: dict[Size, float] = {"small": 0.105, "large": 0.165}
SHAPE_SCALE: dict[Shape, float] = {"circle": 1.0, "square": 0.9, "triangle": 1.3}

POSITIONS: tuple[str, ...] = (  # the 3x3 grid, row by row from the top left
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
RELATION_PHRASES: dict[Relation, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
NUMBER_WORDS = ("one", "two", "three", "four")

# Layout rules, in fractions of the image width.
JITTER = 0.05  # a centre moves up to this far (per axis) from the centre of its grid cell
EDGE_MARGIN = 0.04  # objects keep this far from the border
GAP = 0.045  # the bounding boxes of two objects stay this far apart
CELL_MARGIN = 0.03  # a centre stays this far inside its grid cell, so its position name is unambiguous
RELATION_MARGIN = 0.15  # "A left of B": B's centroid is this far right of A's, or more (see relation_holds)
PLACEMENT_TRIES = 20  # layouts drawn before falling back to small objects at the cell centres

T = TypeVar("T")


@dataclass(frozen=True)
class CaptionMix:
    """What the data set draws: the relative weight of each scene kind, and how often a single object's
    caption names its position and its size. Issue 11 asks whether more captions that say where (the
    default's 21% of all: 0.3 single x 0.7 position) teach positions sooner."""

    single: float = 0.3
    relation: float = 0.25
    count: float = 0.25
    binding: float = 0.2
    position: float = 0.7  # probability that a single object's caption names its position
    size: float = 0.5  # ... and its size

    def __post_init__(self):
        values = dataclasses.asdict(self)
        if not all(0 <= v < float("inf") for v in values.values()):
            raise UnnoiseError(f"a caption mix needs finite numbers >= 0, got {values}")
        if not sum(self.scene_weights.values()) > 0 or max(self.position, self.size) > 1:
            raise UnnoiseError(
                "a caption mix needs a scene kind of weight > 0, and position and size probabilities"
                f" of at most 1; got {values}"
            )

    @property
    def scene_weights(self) -> dict[SceneKind, float]:
        return {
            "single": self.single,
            "relation": self.relation,
            "count": self.count,
            "binding": self.binding,
        }

    @classmethod
    def parse(cls, text: str) -> CaptionMix:
        """'single=0.6,relation=0.2,position=0.9': the named fields changed, the rest as the default."""
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, number = part.partition("=")
            if name.strip() not in names:
                raise UnnoiseError(f"caption mix {text!r}: {name.strip()!r} is not one of {', '.join(names)}")
            try:
                values[name.strip()] = float(number)
            except ValueError:
                raise UnnoiseError(f"caption mix {text!r}: {part!r} is not name=number") from None
        return cls(**values)

    def describe(self) -> str:
        """The fields that differ from the default, as `parse` reads them ('' for the default)."""
        default = CaptionMix()
        return ",".join(
            f"{f.name}={getattr(self, f.name):g}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        )


# --- the ground truth ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is and where, in pixels. `center` is the area centroid (x, y)."""

    shape: Shape
    colour: str
    size: Size
    position_name: str
    center: tuple[float, float]
    radius: float  # half the object's width: a circle's radius, half a square's or a triangle's side

    @property
    def rgb(self) -> RGB:
        return COLOURS[self.colour]

    def bounding_box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in the same units as `center`."""
        left, top, right, bottom = _extent(self.shape, self.radius)
        x, y = self.center
        return x - left, y - top, x + right, y + bottom

    def scaled(self, factor: float) -> ShapeObject:
        x, y = self.center
        return dataclasses.replace(self, center=(x * factor, y * factor), radius=self.radius * factor)


@dataclass(frozen=True)
class Scene:
    """Everything true of one image. In a relation, objects[0] is the subject and objects[1] the reference."""

    kind: SceneKind
    background: str
    objects: tuple[ShapeObject, ...]
    resolution: int
    relation: Relation | None = None
    mentioned: tuple[str, ...] = ()  # what the caption states beyond colour and shape: "size", "position"

    @property
    def background_rgb(self) -> RGB:
        return BACKGROUNDS[self.background]

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and numbers: ready for `json.dumps`."""
        return _json_ready(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        objects = tuple(ShapeObject(**{**o, "center": tuple(o["center"])}) for o in data["objects"])
        return cls(**{**data, "objects": objects, "mentioned": tuple(data["mentioned"])})


def _json_ready(value: Any) -> Any:
    """Tuples become lists, recursively, so a round trip through JSON compares equal."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def position_name(center: tuple[float, float], resolution: float) -> str:
    """The name of the 3x3 grid cell that holds a point given in pixels."""
    col, row = (min(max(int(3 * c / resolution), 0), 2) for c in center)
    return POSITIONS[3 * row + col]


def relation_holds(
    relation: Relation, subject: tuple[float, float], reference: tuple[float, float], *, margin: float
) -> bool:
    """Whether centroid `subject` is `relation` (e.g. left of) `reference`: by at least `margin` along the
    relation's axis, and by more along it than across it. Image y points down, so "above" is smaller y."""
    dx, dy = reference[0] - subject[0], reference[1] - subject[1]
    horizontal = relation in ("left of", "right of")
    along, across = (dx, dy) if horizontal else (dy, dx)
    if relation in ("right of", "below"):
        along = -along
    return along >= margin and along > abs(across)


def _extent(shape: Shape, radius: float) -> tuple[float, float, float, float]:
    """Distances from the centroid to the (left, top, right, bottom) of the shape."""
    if shape == "triangle":  # upright, equilateral, side 2 r: the centroid is h/3 above the base
        height = math.sqrt(3) * radius
        return radius, 2 * height / 3, radius, height / 3
    return radius, radius, radius, radius


# --- drawing a scene at random ---------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def _pick_weighted(rng: np.random.Generator, weights: dict[T, float]) -> T:
    p = np.array(list(weights.values()))
    return list(weights)[int(rng.choice(len(p), p=p / p.sum()))]


def _identities(rng: np.random.Generator, kind: SceneKind) -> list[tuple[Shape, str]]:
    """The (shape, colour) of each object: one; two different; n identical; or 2-3 all distinct."""
    colours = list(COLOURS)
    if kind == "single":
        return [(_pick(rng, SHAPES), _pick(rng, colours))]
    if kind == "relation":
        pairs = list(itertools.product(SHAPES, colours))
        return [pairs[int(k)] for k in rng.choice(len(pairs), 2, replace=False)]
    if kind == "count":
        return [(_pick(rng, SHAPES), _pick(rng, colours))] * int(rng.integers(1, 5))
    n = 2 if rng.random() < 0.7 else 3
    shapes = [SHAPES[int(k)] for k in rng.permutation(len(SHAPES))[:n]]
    distinct_colours = [colours[int(k)] for k in rng.choice(len(colours), n, replace=False)]
    return list(zip(shapes, distinct_colours, strict=True))


def _cells(rng: np.random.Generator, n: int, relation: Relation | None) -> list[int]:
    """Distinct grid cells (0..8, row-major); for a relation, a pair whose grid offset already obeys it."""
    if relation is None:
        return [int(k) for k in rng.choice(9, n, replace=False)]
    return list(_pick(rng, cell_pairs(relation)))


@functools.cache
def cell_pairs(relation: Relation) -> list[tuple[int, int]]:
    """(subject, reference) cells whose grid offset obeys the relation, by a cell or more."""
    cells = itertools.permutations(range(9), 2)
    return [(a, b) for a, b in cells if relation_holds(relation, (a % 3, a // 3), (b % 3, b // 3), margin=1)]


def object_in_cell(shape: Shape, colour: str, size: Size, cell: int, offset: Sequence[float]) -> ShapeObject:
    """An object near the centre of `cell`, moved by `offset` and kept inside the image (unit coordinates)."""
    radius = SIZES[size] * SHAPE_SCALE[shape]
    left, top, right, bottom = _extent(shape, radius)
    row, col = divmod(cell, 3)
    x = _clip((col + 0.5) / 3 + float(offset[0]), left + EDGE_MARGIN, 1 - right - EDGE_MARGIN)
    y = _clip((row + 0.5) / 3 + float(offset[1]), top + EDGE_MARGIN, 1 - bottom - EDGE_MARGIN)
    return ShapeObject(shape, colour, size, POSITIONS[cell], (x, y), radius)


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _well_inside_cell(obj: ShapeObject) -> bool:
    (x, y), (row, col) = obj.center, divmod(POSITIONS.index(obj.position_name), 3)
    inside_x = col / 3 + CELL_MARGIN <= x <= (col + 1) / 3 - CELL_MARGIN
    return inside_x and row / 3 + CELL_MARGIN <= y <= (row + 1) / 3 - CELL_MARGIN


def _apart(a: ShapeObject, b: ShapeObject) -> bool:
    (al, at, ar, ab), (bl, bt, br, bb) = a.bounding_box(), b.bounding_box()
    return bl - ar >= GAP or al - br >= GAP or bt - ab >= GAP or at - bb >= GAP


def valid_layout(objects: Sequence[ShapeObject], relation: Relation | None) -> bool:
    """Every rule a caption relies on, checked on the final layout (unit coordinates)."""
    if not all(_well_inside_cell(o) for o in objects):
        return False
    if not all(_apart(a, b) for a, b in itertools.combinations(objects, 2)):
        return False
    return relation is None or relation_holds(
        relation, objects[0].center, objects[1].center, margin=RELATION_MARGIN
    )


def _layout(
    rng: np.random.Generator, identities: list[tuple[Shape, str]], cells: list[int], relation: Relation | None
) -> list[ShapeObject]:
    """Rejection sampling of sizes and offsets. The second half of the tries draws small objects only,
    and small objects at the cell centres, the last resort, always fit."""
    for attempt in range(PLACEMENT_TRIES):
        sizes = [_pick(rng, SIZE_NAMES) if attempt < PLACEMENT_TRIES // 2 else "small" for _ in cells]
        offsets = rng.uniform(-JITTER, JITTER, size=(len(cells), 2))  # (n, 2)
        placements = zip(identities, sizes, cells, offsets, strict=True)
        objects = [
            object_in_cell(shape, colour, size, cell, off) for (shape, colour), size, cell, off in placements
        ]
        if valid_layout(objects, relation):
            return objects
    objects = [
        object_in_cell(*ident, "small", cell, (0.0, 0.0))
        for ident, cell in zip(identities, cells, strict=True)
    ]
    if not valid_layout(objects, relation):
        raise AssertionError("the fallback layout broke a rule: the layout constants disagree")
    return objects


def _noun_phrase(obj: ShapeObject, *, size: bool = False) -> str:
    words = f"{obj.size} {obj.colour} {obj.shape}" if size else f"{obj.colour} {obj.shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def _caption(
    rng: np.random.Generator,
    kind: SceneKind,
    objects: Sequence[ShapeObject],
    relation: Relation | None,
    mix: CaptionMix,
) -> tuple[str, tuple[str, ...]]:
    """The caption and what it states beyond colour and shape."""
    if kind == "single":
        mentioned = tuple(
            word for word, p in (("size", mix.size), ("position", mix.position)) if rng.random() < p
        )
        caption = _noun_phrase(objects[0], size="size" in mentioned)
        if "position" in mentioned:
            caption += " " + POSITION_PHRASES[objects[0].position_name]
        return caption, mentioned
    if kind == "relation":
        return f"{_noun_phrase(objects[0])} {RELATION_PHRASES[relation]} {_noun_phrase(objects[1])}", ()
    if kind == "count":
        plural = "s" if len(objects) > 1 else ""
        return f"{NUMBER_WORDS[len(objects) - 1]} {objects[0].colour} {objects[0].shape}{plural}", ()
    phrases = [_noun_phrase(o) for o in objects]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1], ()


def sample_scene(seed: int, index: int, resolution: int, mix: CaptionMix = CaptionMix()) -> tuple[Scene, str]:
    """The ground truth and caption of sample `index` of the data set `seed`, without drawing it."""
    rng = np.random.default_rng([seed, index])
    kind = _pick_weighted(rng, mix.scene_weights)
    background = _pick(rng, list(BACKGROUNDS))
    relation = _pick(rng, RELATIONS) if kind == "relation" else None
    identities = _identities(rng, kind)
    objects = _layout(rng, identities, _cells(rng, len(identities), relation), relation)
    caption, mentioned = _caption(rng, kind, objects, relation, mix)
    in_pixels = tuple(o.scaled(resolution) for o in objects)
    return Scene(kind, background, in_pixels, resolution, relation, mentioned), caption


# --- drawing it on the page --------------------------------------------------------------------------


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, scale: int, fill: RGB | int | None = None) -> None:
    """Draw one object (in its colour, or `fill`) on a canvas `scale` times the scene's resolution. Pillow
    takes float coordinates as continuous positions (0 is the left edge of pixel 0), the convention of the
    ground truth."""
    left, top, right, bottom = (v * scale for v in obj.bounding_box())
    fill = obj.rgb if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif obj.shape == "square":
        draw.polygon([(left, top), (right, top), (right, bottom), (left, bottom)], fill=fill)
    else:
        draw.polygon([(obj.center[0] * scale, top), (right, bottom), (left, bottom)], fill=fill)


def render(scene: Scene, *, supersample: int = 4) -> np.ndarray:
    """The scene as a uint8 image (H, W, 3): drawn `supersample` times larger, then box-filtered down."""
    size = scene.resolution * supersample
    canvas = Image.new("RGB", (size, size), scene.background_rgb)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, supersample)
    small = canvas.resize((scene.resolution, scene.resolution), Image.Resampling.BOX)
    return np.asarray(small)  # (H, W, 3) uint8


def coverage(scene: Scene, obj: ShapeObject, *, supersample: int = 4) -> np.ndarray:
    """The fraction of each pixel `obj` covers (H, W) float32 in [0, 1], drawn as `render` draws it."""
    size = scene.resolution * supersample
    canvas = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(canvas), obj, supersample, fill=255)
    small = canvas.resize((scene.resolution, scene.resolution), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255


@dataclass(frozen=True)
class GroundedWords:
    """Which caption words the grounding loss places beyond the colour and shape words, which it always
    does (train/grounding.py): the words of place, in the object they place; the number words of a count,
    in every object counted."""

    places: bool = False
    numbers: bool = False


def word_masks(
    scene: Scene, *, supersample: int = 4, words: GroundedWords = GroundedWords()
) -> dict[str, np.ndarray]:
    """Where each colour and shape word of the scene's caption is in the image: word -> (H, W) float32
    coverage of the objects it names ("red": every red object; "circle" and "circles": every circle),
    for a loss that teaches cross-attention which pixels a word belongs to (train/grounding.py).

    With `words.places`, the words of place too, as the object they place: a single object's stated
    position ("top" and "left" of "in the top left": that object) and a relation's word ("left" of "to the
    left of", "above": its subject, objects[0]). With `words.numbers`, a count's number word ("three" of
    "three red circles"): every object counted."""
    masks: dict[str, np.ndarray] = {}
    covered = [coverage(scene, obj, supersample=supersample) for obj in scene.objects]
    for obj, area in zip(scene.objects, covered, strict=True):
        for word in (obj.colour, obj.shape, obj.shape + "s"):
            masks[word] = np.maximum(masks.get(word, 0), area)
    if words.places:
        for word in place_words(scene):
            masks[word] = covered[0]
    if words.numbers:
        for word in number_words(scene):
            masks[word] = np.maximum.reduce(covered)
    return masks


def place_words(scene: Scene) -> tuple[str, ...]:
    """The caption's words of place, all of which place objects[0]: ("top", "left") for "in the top left",
    ("left",) for "to the left of", ("above",); () when the caption states no place."""
    if scene.relation is not None:
        return (scene.relation.split()[0],)
    if "position" in scene.mentioned:
        return tuple(scene.objects[0].position_name.split())
    return ()


def number_words(scene: Scene) -> tuple[str, ...]:
    """The caption's number word, which counts all the objects: ("three",) for "three red circles"; () for
    the captions that state no count."""
    return (NUMBER_WORDS[len(scene.objects) - 1],) if scene.kind == "count" else ()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (..., H, W, 3) as float32 (..., 3, H, W) in [-1, 1]."""
    pixels = torch.from_numpy(np.array(images, dtype=np.uint8)).movedim(-1, -3)  # a copy: (..., 3, H, W)
    return pixels.float() / 127.5 - 1


# --- the data set ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ShapesSample:
    """One captioned image with its ground truth. The image is read-only; `tensor()` returns a copy."""

    index: int
    caption: str
    scene: Scene
    image: np.ndarray  # (H, W, 3) uint8

    def tensor(self) -> torch.Tensor:
        """The image as float32 (3, H, W) in [-1, 1], what a diffusion model trains on."""
        return to_tensor(self.image)


@dataclass(frozen=True)
class ShapesDataset:
    """Unbounded, deterministic captioned shapes: `dataset[i]` depends only on (seed, i).

    There is no `len`: any index >= 0 is a sample. Iterating yields samples 0, 1, 2, ... for ever.
    `batch` doubles as a collate function, so DataLoader workers can draw batches of indices:
    `DataLoader(range(n), batch_size=64, collate_fn=dataset.batch, num_workers=4)`.
    """

    resolution: int = 32
    seed: int = 0
    supersample: int = 4  # drawn this many times larger, then box-filtered down
    mix: CaptionMix = CaptionMix()

    def __post_init__(self):
        if self.resolution < 16:
            raise UnnoiseError(f"shapes need a resolution of at least 16 pixels, got {self.resolution}")
        if self.seed < 0 or self.supersample < 1:
            raise UnnoiseError(
                f"the seed must be >= 0 and supersample >= 1, got {self.seed}, {self.supersample}"
            )

    def __getitem__(self, index: int) -> ShapesSample:
        index = operator.index(index)
        if index < 0:
            raise IndexError(f"the shapes data set is unbounded, so it has no index {index}")
        scene, caption = sample_scene(self.seed, index, self.resolution, self.mix)
        return ShapesSample(index, caption, scene, render(scene, supersample=self.supersample))

    def __iter__(self) -> Iterator[ShapesSample]:
        return (self[i] for i in itertools.count())

    def batch(self, indices: Iterable[int]) -> tuple[torch.Tensor, list[str]]:
        """Images (B, 3, H, W) in [-1, 1] and their B captions."""
        samples = [self[i] for i in indices]
        images = to_tensor(np.stack([s.image for s in samples]))  # (B, 3, H, W)
        return images, [s.caption for s in samples]

    def batches(self, batch_size: int, *, start: int = 0) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Consecutive batches start, start + 1, ... for ever."""
        for first in itertools.count(start, batch_size):
            yield self.batch(range(first, first + batch_size))
