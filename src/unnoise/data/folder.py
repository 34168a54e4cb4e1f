"""A user's folder of captioned images, read in the conventions people already have.

Two caption conventions, detected automatically:

- Hugging Face "imagefolder": `metadata.jsonl` (or `metadata.csv`) at the folder root, one row per
  image, with `file_name` (a path relative to the root) and a caption column (`text` by default).
  Images in the folder that no row lists are skipped as "missing caption".
- kohya-ss sidecars: the caption of `cats/photo.png` is in `cats/photo.txt`; subfolders are searched.

`scan_folder` opens and fully decodes every image once, keeping nothing, so corrupt, truncated and
oversized files are found before training starts. Every image (or metadata row) ends up either usable
or skipped for exactly one reason, and the `ScanReport` counts both with a few examples per reason.
An empty caption is kept: such images train the unconditional model that classifier-free guidance
needs. Only the Pillow decoders for the accepted extensions are used (never EPS, which runs
Ghostscript), and nothing is ever unpickled.

`ImageFolderDataset` turns the usable items into (3, R, R) float tensors in [-1, 1]: EXIF orientation
applied, transparency composited over a background colour, any mode (palette, grayscale, 16-bit,
CMYK) made 8-bit RGB, the short side resized to R and the centre cropped. Random flips are left to
the training loop, which owns the random generator.
"""

from __future__ import annotations

import csv
import json
import os
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from unnoise.errors import UnnoiseError

T = TypeVar("T")  # what a scan's `decode` makes of each usable image

# PNG text chunks are inflated before any byte or pixel bound applies: Pillow allows 1 MB a chunk and 64 MB
# an image, so an 84 KB file of 62 compressed 1 MB chunks made a reader hold 62 MB (issue 31). A settings
# text is a few KB; these bounds refuse such a file after inflating at most 64 KB.
PNG_TEXT_CHUNK = 64 * 1024
PNG_TEXT_MEMORY = 256 * 1024


def limit_png_text() -> None:
    """Bound Pillow's PNG text chunks for this process (every reader of ours imports this module)."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = PNG_TEXT_CHUNK
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_MEMORY


limit_png_text()

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # the decoders tried, whatever the file name
DEFAULT_MAX_PIXELS = 8192 * 8192  # larger images are skipped as "too large" before they are decoded
SIDECARS = (".txt", ".caption")  # caption files beside an image, looked for in this order (kohya-ss)
EXAMPLES_PER_REASON = 5  # kept in the report
EXAMPLES_IN_SUMMARY = 3  # shown in its summary line

SkipReason = Literal[
    "unreadable/corrupt",
    "not an image",
    "truncated",
    "too large",
    "missing caption",
    "unreadable caption",
    "missing file",
    "not a regular file",
    "outside the folder",
    "bad metadata line",
]
SKIP_REASONS: tuple[SkipReason, ...] = typing.get_args(SkipReason)
# How each reason reads after a count in the summary line: (one, many).
_REASON_WORDS: dict[SkipReason, tuple[str, str]] = {
    "unreadable/corrupt": ("unreadable/corrupt", "unreadable/corrupt"),
    "not an image": ("not an image", "not images"),
    "truncated": ("truncated", "truncated"),
    "too large": ("too large", "too large"),
    "missing caption": ("without caption", "without caption"),
    "unreadable caption": ("with an unreadable caption", "with unreadable captions"),
    "missing file": ("listed but missing", "listed but missing"),
    "not a regular file": ("not a regular file", "not regular files"),
    "outside the folder": ("listed outside the folder", "listed outside the folder"),
    "bad metadata line": ("bad metadata line", "bad metadata lines"),
}
EMPTY_CAPTION = "empty caption"  # a key of `ScanReport.examples`, but not a reason to skip

CaptionSource = Literal["metadata.jsonl", "metadata.csv", "txt sidecars"]
METADATA_FILES: tuple[CaptionSource, ...] = ("metadata.jsonl", "metadata.csv")  # looked for in this order


# ----------------------------------------------------------------------------- the report


@dataclass
class ScanReport:
    """What a scan found: each image or metadata row is either usable or skipped for one reason."""

    root: Path
    caption_source: CaptionSource
    caption_column: str  # the metadata column read for captions (unused for .txt sidecars)
    max_pixels: int
    usable: int = 0
    empty_captions: int = 0  # usable images whose caption is "" (kept, as unconditional samples)
    skipped: dict[SkipReason, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> up to 5 paths, root-relative

    @property
    def found(self) -> int:
        """Images (or metadata rows) looked at: usable plus skipped."""
        return self.usable + sum(self.skipped.values())

    def skip(self, reason: SkipReason, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self._note_example(reason, where)

    def keep(self, caption: str, path: Path) -> None:
        self.usable += 1
        if caption == "":
            self.empty_captions += 1
            self._note_example(EMPTY_CAPTION, relative(path, self.root))

    def _note_example(self, key: str, where: str) -> None:
        examples = self.examples.setdefault(key, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(where)

    def summary(self) -> str:
        """One line, e.g. "3786 images: 3780 usable, 4 unreadable/corrupt (e.g. a.png), 2 without caption"."""
        parts = [f"{self.usable} usable"]
        for reason in SKIP_REASONS:
            count = self.skipped.get(reason, 0)
            if count:
                one, many = _REASON_WORDS[reason]
                limit = f" (over {self.max_pixels:,} pixels)" if reason == "too large" else ""
                parts.append(f"{count} {one if count == 1 else many}{limit}{self._examples_text(reason)}")
        if self.empty_captions:
            parts.append(f"{self.empty_captions} with empty caption (kept as unconditional)")
        noun = "image" if self.found == 1 else "images"
        return f"{self.found} {noun}: " + ", ".join(parts)

    def _examples_text(self, key: str) -> str:
        shown = self.examples.get(key, [])[:EXAMPLES_IN_SUMMARY]
        return f" (e.g. {', '.join(shown)})" if shown else ""

    def describe_source(self) -> str:
        if self.caption_source == "txt sidecars":
            return "captions from .txt files beside the images"
        return f"captions from {self.caption_source}, column {self.caption_column!r}"


@dataclass
class FolderScan:
    """The usable (image path, caption) pairs of a folder, in a stable order, and the report."""

    root: Path
    items: list[tuple[Path, str]]
    report: ScanReport


# ----------------------------------------------------------------------------- scanning


def scan_folder(
    root: str | Path, *, caption_column: str = "text", max_pixels: int = DEFAULT_MAX_PIXELS
) -> FolderScan:
    """Find the captioned images under `root` and decode each once to check it; keep no pixels.

    Raises `UnnoiseError` only when `root` is not a folder; a folder with nothing usable gives a scan
    with no items, and its report says why.
    """
    scan, _ = scan_and_decode(root, caption_column=caption_column, max_pixels=max_pixels, decode=decode_fully)
    return scan


def scan_and_decode(
    root: str | Path, *, caption_column: str, max_pixels: int, decode: Callable[[Image.Image], T]
) -> tuple[FolderScan, list[T]]:
    """The scan, with `decode(opened image)` as the check; returns what it gave for each usable item.

    `decode` must read all the pixels (a truncated file fails only then); whatever it raises is
    counted under `failure_reason`, so one pass both checks the files and (if wanted) preprocesses them.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UnnoiseError(
            f"image folder not found: {root}" if not root.exists() else f"not a folder: {root}"
        )
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise UnnoiseError(f"max_pixels must be a positive whole number, got {max_pixels!r}")
    source = detect_caption_source(root)
    report = ScanReport(root, source, caption_column, max_pixels)
    if source == "txt sidecars":
        candidates = sidecar_candidates(root, report)
    else:
        candidates = metadata_candidates(root, source, caption_column, report)
    items: list[tuple[Path, str]] = []
    decoded: list[T] = []
    with pillow_size_checks_off():
        for path, caption in candidates:
            try:
                decoded.append(open_within_limit(path, max_pixels, decode))
            except Exception as error:  # whatever a decoder raises is a fault of the file: counted
                report.skip(failure_reason(error), relative(path, root))
                continue
            items.append((path, caption))
            report.keep(caption, path)
    return FolderScan(root, items, report), decoded


def detect_caption_source(root: Path) -> CaptionSource:
    for name in METADATA_FILES:
        if (root / name).is_file():
            return name
    return "txt sidecars"


def image_files(root: Path) -> list[Path]:
    """Files with an image extension under `root`, sorted, skipping hidden files and folders."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(folder, name))
    return sorted(found)


def sidecar_candidates(root: Path, report: ScanReport) -> Iterator[tuple[Path, str]]:
    """kohya-ss style: each image's caption is the .txt (or .caption) file with the same stem beside it."""
    for path in image_files(root):
        caption_file = next((f for f in map(path.with_suffix, SIDECARS) if f.is_file()), None)
        if caption_file is None:
            report.skip("missing caption", relative(path, root))
            continue
        try:  # utf-8-sig: a byte-order mark, as Windows editors write, is not part of the caption
            caption = caption_file.read_text(encoding="utf-8-sig", errors="replace").strip()
        except OSError:  # unreadable (permissions, I/O): skipped and counted like any other fault
            report.skip("unreadable caption", relative(caption_file, root))
            continue
        yield path, caption


def metadata_candidates(
    root: Path, source: CaptionSource, caption_column: str, report: ScanReport
) -> Iterator[tuple[Path, str]]:
    """Hugging Face imagefolder style: rows of `file_name` and a caption column, in file order."""
    listed: set[Path] = set()
    read_rows = read_jsonl_rows if source == "metadata.jsonl" else read_csv_rows
    for line_number, row in read_rows(root / source, report):
        file_name = row.get("file_name")
        caption = row.get(caption_column)
        if not isinstance(file_name, str) or not file_name.strip():
            report.skip("bad metadata line", f"{source} line {line_number} (no file_name)")
            continue
        name = Path(file_name.strip())
        if name.is_absolute() or ".." in name.parts:  # file_name names a file inside the folder, no more
            report.skip("outside the folder", f"{source} line {line_number} ({file_name.strip()})")
            continue
        path = root / name
        listed.add(path)
        if caption is None:
            report.skip("missing caption", relative(path, root))
        elif not isinstance(caption, str):
            report.skip("bad metadata line", f"{source} line {line_number} ({caption_column} is not text)")
        else:
            yield path, caption.strip()
    for path in image_files(root):
        if path not in listed:
            report.skip("missing caption", relative(path, root))


def read_jsonl_rows(path: Path, report: ScanReport) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each JSON object line; other non-blank lines are reported and skipped."""
    with path.open(encoding="utf-8-sig", errors="replace") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                yield line_number, row
            else:
                report.skip("bad metadata line", f"{path.name} line {line_number} (not a JSON object)")


def read_csv_rows(path: Path, report: ScanReport) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each CSV row, keyed by the header; unparsable rows are reported."""
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
        reader = csv.DictReader(file)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:
                report.skip("bad metadata line", f"{path.name} line {reader.line_num} (not valid CSV)")
                continue
            yield reader.line_num, row


class TooLargeError(Exception):
    """An image with more pixels than `max_pixels`, refused before decoding."""


class NotRegularFileError(OSError):
    """A FIFO, socket or device with an image's name: opening it could block for ever."""


def open_within_limit(path: Path, max_pixels: int, decode: Callable[[Image.Image], T]) -> T:
    """Open `path` with the decoders of the accepted formats, refuse it if too large, else decode it."""
    if path.exists() and not path.is_file():  # is_file: a regular file (or a link to one)
        raise NotRegularFileError(str(path))
    with Image.open(path, formats=PIL_FORMATS) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise TooLargeError(f"{width}x{height} pixels")
        return decode(image)


def decode_fully(image: Image.Image) -> None:
    """Read every pixel and keep none: the only way to find a truncated or corrupt file."""
    image.load()


def failure_reason(error: Exception) -> SkipReason:
    if isinstance(error, (TooLargeError, Image.DecompressionBombError)):
        return "too large"
    if isinstance(error, FileNotFoundError):
        return "missing file"
    if isinstance(error, NotRegularFileError):
        return "not a regular file"
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if "truncated" in str(error).lower():
        return "truncated"
    return "unreadable/corrupt"


@contextmanager
def pillow_size_checks_off() -> Iterator[None]:
    """Silence Pillow's decompression-bomb warning: `max_pixels` is checked before decoding instead.

    (Pillow still raises DecompressionBombError past twice its own limit; that is counted "too large".)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- preprocessing


def load_square_image(
    path: str | Path,
    *,
    resolution: int,
    background: tuple[int, int, int] = (255, 255, 255),
    center_crop: bool = True,
) -> torch.Tensor:
    """Read one image file as a (3, resolution, resolution) uint8 RGB tensor, preprocessed as in training."""
    with Image.open(path, formats=PIL_FORMATS) as image:
        return preprocess(image, resolution=resolution, background=background, center_crop=center_crop)


def preprocess(
    image: Image.Image, *, resolution: int, background: tuple[int, int, int], center_crop: bool
) -> torch.Tensor:
    """An opened image -> (3, resolution, resolution) uint8 RGB: upright, composited, resized, cropped."""
    image.load()  # decode first, so a broken file fails here and not inside the EXIF handling
    rgb = to_rgb(upright(image), background)
    square = resize_square(rgb, resolution, center_crop=center_crop)
    return torch.from_numpy(np.array(square, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; an unreadable tag leaves the image as it was stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF is common in the wild and is no reason to lose the image
        return image


def to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent pixels are composited over `background`."""
    if image.mode.startswith("I"):  # "I", "I;16", "I;16B", ...: 16-bit grayscale
        image = sixteen_bit_to_gray(image)
    elif image.mode == "F":
        image = image.convert("L")
    if has_transparency(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def has_transparency(image: Image.Image) -> bool:
    """An alpha band (RGBA, LA, PA, ...) or a transparent palette entry / colour key in `info`."""
    return "A" in image.getbands() or "transparency" in image.info


def sixteen_bit_to_gray(image: Image.Image) -> Image.Image:
    """Scale 16-bit samples (0..65535) to 8 bits (0..255); Pillow's own convert would clip them."""
    samples = np.asarray(image).astype(np.float32)  # (H, W)
    return Image.fromarray(np.clip(np.rint(samples / 257.0), 0, 255).astype(np.uint8), mode="L")


def resize_square(image: Image.Image, resolution: int, *, center_crop: bool) -> Image.Image:
    """Short side to `resolution` and the centre cropped, or (center_crop=False) the whole image squashed."""
    width, height = image.size
    if center_crop:
        side = min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    else:
        side = max(width, height)
        box = (0, 0, width, height)
    # LANCZOS keeps detail when shrinking; BICUBIC rings less when enlarging.
    resample = Image.Resampling.LANCZOS if side >= resolution else Image.Resampling.BICUBIC
    return image.resize((resolution, resolution), resample, box=box, reducing_gap=3.0)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return pixels.to(torch.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- the data set


class ImageFolderDataset(Dataset):
    """A folder of captioned images: `dataset[i]` is (image (3, R, R) float32 in [-1, 1], caption).

    With `preload=True` (the fast choice for small data sets) the scan itself preprocesses every image
    into one uint8 tensor (N, 3, R, R): one decode per file, and a file that fails anywhere in that
    (decoding, mode conversion, resizing) is skipped and counted in `report`, never raised. With
    `preload=False` the scan only checks the files and `__getitem__` decodes them (e.g. in DataLoader
    workers); a file that breaks after the scan is then an `UnnoiseError` naming it.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        resolution: int,
        background: tuple[int, int, int] = (255, 255, 255),
        center_crop: bool = True,
        caption_column: str = "text",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        preload: bool = True,
    ) -> None:
        check_resolution(resolution)
        check_background(background)
        self.resolution = resolution
        self.background = tuple(background)
        self.center_crop = center_crop
        decode = self._preprocess if preload else decode_fully
        scan, decoded = scan_and_decode(
            root, caption_column=caption_column, max_pixels=max_pixels, decode=decode
        )
        require_usable(scan.report)
        self._report = scan.report
        self._items = scan.items
        self._pixels = torch.stack(decoded) if preload else None  # (N, 3, R, R) uint8

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(
            image, resolution=self.resolution, background=self.background, center_crop=self.center_crop
        )

    def _load(self, path: Path) -> torch.Tensor:
        with pillow_size_checks_off():
            return load_square_image(
                path, resolution=self.resolution, background=self.background, center_crop=self.center_crop
            )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self._items[index]
        if self._pixels is not None:
            return to_unit_range(self._pixels[index]), caption
        try:
            pixels = self._load(path)
        except Exception as error:
            raise UnnoiseError(
                f"could not read {path} ({error}); it was readable when {self._report.root} was scanned"
            ) from error
        return to_unit_range(pixels), caption  # (3, R, R)

    @property
    def captions(self) -> list[str]:
        """The caption of each item, in index order (for precomputing text embeddings)."""
        return [caption for _, caption in self._items]

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self._items]

    @property
    def report(self) -> ScanReport:
        return self._report

    @property
    def pixels(self) -> torch.Tensor:
        """Every usable image, preprocessed: (N, 3, R, R) uint8 (a preloaded data set only)."""
        if self._pixels is None:
            raise UnnoiseError("the images were not preloaded (preload=False)")
        return self._pixels


def folder_resolution(root: str | Path, caption_column: str = "text", say=print) -> int:
    """The side to train a folder at: its images' size when they are all one square size; otherwise the
    short side most of them have, said with the counts (`say`), since others will be resized and cropped."""
    scan, sizes = scan_and_decode(
        root, caption_column=caption_column, max_pixels=DEFAULT_MAX_PIXELS, decode=lambda image: image.size
    )
    require_usable(scan.report)
    counts: dict[tuple[int, int], int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    (width, height), _ = max(counts.items(), key=lambda item: item[1])
    side = min(width, height)
    if len(counts) == 1:
        cropped = "" if width == height else " (the short side: the centre is cropped square)"
        say(f"resolution {side}: every image of {root} is {width}x{height}{cropped}")
    else:
        shown = ", ".join(f"{n} at {w}x{h}" for (w, h), n in sorted(counts.items(), key=lambda i: -i[1])[:4])
        say(
            f"resolution {side} (the short side of the most common size): the images of {root} differ in size"
            f" ({shown}{', ...' if len(counts) > 4 else ''}); the others are resized and centre-cropped, or"
            " give --resolution"
        )
    return side


def require_usable(report: ScanReport) -> None:
    if report.usable > 0:
        return
    if report.found == 0:
        reason = f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {report.root}"
    else:
        reason = f"no usable images in {report.root}"
    raise UnnoiseError(f"{reason} ({report.describe_source()}): {report.summary()}")


def check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise UnnoiseError(f"resolution must be a positive whole number of pixels, got {resolution!r}")


def check_background(background: tuple[int, int, int]) -> None:
    values = tuple(background) if isinstance(background, (tuple, list)) else ()
    if len(values) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise UnnoiseError(f"background must be three integers 0-255 (R, G, B), got {background!r}")
