"""A folder of captioned images: three caption conventions, every image mode, every bad file counted."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unnoise.data.folder import ImageFolderDataset, load_square_image, scan_folder
from unnoise.errors import UnnoiseError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
EMOJI = Path("/work/shared/datasets/emoji-noto-64")


def solid(color, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def write_jsonl(root: Path, rows: list) -> None:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def as_bytes(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> (H, W, 3) uint8, the colours the tests speak in."""
    return np.rint((image.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(size=(32, 32), seed=0) -> Image.Image:
    """Incompressible pixels, so the PNG has a long IDAT chunk to damage."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header says width x height (a decompression bomb's header)."""
    data = bytearray(png_bytes(solid(RED)))
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    return bytes(data)


# ----------------------------------------------------------------------------- caption conventions


def test_metadata_jsonl(tmp_path):
    save(solid(RED), tmp_path / "images/a.png")
    save(solid(GREEN), tmp_path / "images/b.jpg", quality=95)
    write_jsonl(
        tmp_path,
        [
            {"file_name": "images/a.png", "text": " a red square "},
            {"file_name": "images/b.jpg", "text": "green"},
        ],
    )
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert len(dataset) == 2
    assert dataset.captions == ["a red square", "green"]
    image, caption = dataset[0]
    assert caption == "a red square"
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert (as_bytes(image) == RED).all()
    assert dataset.report.summary() == "2 images: 2 usable"


def test_metadata_csv_with_a_chosen_caption_column(tmp_path):
    save(solid(RED), tmp_path / "a.png")
    save(solid(BLUE), tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text,caption\na.png,ignored,"red, bright"\nb.png,x,blue\n'
    )
    scan = scan_folder(tmp_path, caption_column="caption")
    assert [(path.name, caption) for path, caption in scan.items] == [
        ("a.png", "red, bright"),
        ("b.png", "blue"),
    ]
    assert scan.report.caption_source == "metadata.csv"


def test_txt_sidecars_searched_recursively(tmp_path):
    save(solid(RED), tmp_path / "cats/deep/one.png")
    (tmp_path / "cats/deep/one.txt").write_text("  a cat\n")
    save(solid(BLUE), tmp_path / "TWO.JPEG", quality=95)
    (tmp_path / "TWO.txt").write_text("a dog")
    save(solid(GREEN), tmp_path / "uncaptioned.png")
    save(solid(GREEN), tmp_path / ".cache/hidden.png")  # hidden folders are not the user's data
    (tmp_path / "notes.md").write_text("not an image, not counted")
    scan = scan_folder(tmp_path)
    assert sorted(caption for _, caption in scan.items) == ["a cat", "a dog"]
    assert scan.report.caption_source == "txt sidecars"
    assert scan.report.skipped == {"missing caption": 1}
    assert scan.report.examples["missing caption"] == ["uncaptioned.png"]


def test_empty_caption_is_kept_and_counted(tmp_path):
    save(solid(RED), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("   \n")
    scan = scan_folder(tmp_path)
    assert scan.items[0][1] == ""
    assert scan.report.usable == 1 and scan.report.empty_captions == 1
    assert "1 with empty caption (kept as unconditional)" in scan.report.summary()


# ----------------------------------------------------------------------------- image modes


def caption_all(root: Path) -> None:
    """A .txt sidecar beside each image, holding the image's stem."""
    for path in sorted(root.iterdir()):
        if path.suffix != ".txt":
            path.with_suffix(".txt").write_text(path.stem)


def load_all(root: Path, **options) -> dict[str, np.ndarray]:
    caption_all(root)
    dataset = ImageFolderDataset(root, **options)
    assert dataset.report.usable == len(dataset) == len(list(root.glob("*.txt")))
    return {caption: as_bytes(image) for image, caption in (dataset[i] for i in range(len(dataset)))}


def test_transparency_is_composited_over_the_background(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :, 1] = 255  # hidden green under alpha 0 must not leak through
    rgba[:, 4:] = (*RED, 255)
    save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png")
    save(Image.fromarray(rgba[:, :, [0, 3]], "LA"), tmp_path / "la.png")
    palette = Image.fromarray(np.where(np.arange(8) < 4, 0, 1).astype(np.uint8)[None].repeat(8, 0), "P")
    palette.putpalette([0, 255, 0, *RED])
    save(palette, tmp_path / "palette.png", transparency=0)
    save(palette, tmp_path / "palette_gif.gif", transparency=0)
    background = (10, 20, 200)
    images = load_all(tmp_path, resolution=8, background=background)
    for name in ("rgba", "palette", "palette_gif"):
        assert (images[name][:, :4] == background).all(), name
        assert (images[name][:, 4:] == RED).all(), name
    assert (images["la"][:, :4] == background).all() and (images["la"][:, 4:] == (255, 255, 255)).all()


def test_palette_grayscale_16_bit_cmyk_and_gif_first_frame(tmp_path):
    palette = solid(0, mode="P")
    palette.putpalette([*BLUE])
    save(palette, tmp_path / "palette.png")
    save(solid(128, mode="L"), tmp_path / "gray.png")
    save(solid(True, mode="1"), tmp_path / "bilevel.bmp")
    sixteen = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 = 128 * 257
    assert sixteen.mode == "I;16"
    save(sixteen, tmp_path / "sixteen.png")
    save(solid((0, 255, 255, 0), mode="CMYK"), tmp_path / "cmyk.tif")  # cyan-free, full magenta + yellow: red
    frames = [solid(RED, mode="RGB").convert("P"), solid(BLUE, mode="RGB").convert("P")]
    save(frames[0], tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    images = load_all(tmp_path, resolution=8)
    assert (images["palette"] == BLUE).all()
    assert (images["gray"] == 128).all()
    assert (images["bilevel"] == 255).all()
    assert (images["sixteen"] == 128).all()  # scaled to 8 bits, not clipped to 255
    assert (images["cmyk"] == RED).all()
    assert (images["animated"] == RED).all()


def three_stripes(size, vertical: bool) -> Image.Image:
    """Red, green, blue thirds, left to right (or top to bottom)."""
    width, height = size
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    length = width if vertical else height
    for i, color in enumerate((RED, GREEN, BLUE)):
        part = slice(i * length // 3, (i + 1) * length // 3)
        if vertical:
            pixels[:, part] = color
        else:
            pixels[part, :] = color
    return Image.fromarray(pixels)


def test_non_square_images_are_centre_cropped_or_squashed(tmp_path):
    # The filter reads a few pixels beyond the crop box, so the green thirds are wider than the crop.
    wide = tmp_path / "wide.png"
    save(three_stripes((90, 10), vertical=True), wide)
    save(three_stripes((10, 90), vertical=False), tmp_path / "tall.png")
    cropped = load_all(tmp_path, resolution=4)
    assert cropped["wide"].shape == cropped["tall"].shape == (4, 4, 3)
    assert (cropped["wide"] == GREEN).all()
    assert (cropped["tall"] == GREEN).all()
    squashed = load_square_image(wide, resolution=6, center_crop=False).permute(1, 2, 0).numpy()
    assert squashed.shape == (6, 6, 3)
    assert (squashed[:, 0] == RED).all() and (squashed[:, -1] == BLUE).all()


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), dtype=np.uint8)
    stored[:, :10], stored[:, 10:] = RED, BLUE  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display, so left becomes top
    save(Image.fromarray(stored), tmp_path / "photo.png", exif=exif)
    image = as_bytes(
        load_square_image(tmp_path / "photo.png", resolution=10, center_crop=False).float() / 127.5 - 1
    )
    assert (image[0] == RED).all() and (image[-1] == BLUE).all()


def test_preload_and_lazy_loading_agree(tmp_path):
    save(noise_image((40, 24)), tmp_path / "a.png")
    save(solid(GREEN, (5, 7)), tmp_path / "b.webp", lossless=True)
    caption_all(tmp_path)
    preloaded = ImageFolderDataset(tmp_path, resolution=16)
    lazy = ImageFolderDataset(tmp_path, resolution=16, preload=False)
    assert preloaded.captions == lazy.captions == ["a", "b"]
    for i in range(2):
        assert torch.equal(preloaded[i][0], lazy[i][0])


# ----------------------------------------------------------------------------- bad files, counted


MAX_PIXELS = 1100  # the good images are 32 x 32 = 1024 pixels


def folder_of_bad_files(root: Path) -> None:
    good = png_bytes(noise_image())
    (root / "good.png").write_bytes(good)
    (root / "blank.png").write_bytes(png_bytes(solid(RED)))
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "corrupt.png").write_bytes(good[:100] + bytes(b ^ 0x5A for b in good[100:300]) + good[300:])
    (root / "notes.png").write_text("this is a text file with the wrong name")
    (root / "big.png").write_bytes(png_bytes(noise_image((40, 30))))  # 1200 pixels > max_pixels
    (root / "bomb.png").write_bytes(png_claiming_size(30_000, 30_000))  # past Pillow's own bomb limit
    (root / "uncaptioned.png").write_bytes(good)
    rows = [
        {"file_name": name, "text": name.removesuffix(".png")}
        for name in (
            "good.png",
            "truncated.png",
            "corrupt.png",
            "notes.png",
            "big.png",
            "bomb.png",
            "gone.png",
        )
    ]
    rows.insert(2, '{"file_name": "blank.png", "text": ')  # line 3: not JSON
    rows.append({"file_name": "blank.png", "text": ""})
    write_jsonl(root, rows)


def test_every_bad_file_is_counted_under_its_reason(tmp_path):
    folder_of_bad_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, resolution=8, max_pixels=MAX_PIXELS)
    report = dataset.report
    assert dataset.captions == ["good", ""]
    assert report.usable == 2 and report.empty_captions == 1
    assert report.skipped == {
        "truncated": 1,
        "unreadable/corrupt": 1,
        "not an image": 1,
        "too large": 2,
        "missing file": 1,
        "missing caption": 1,
        "bad metadata line": 1,
    }
    assert report.found == 10
    assert report.examples["truncated"] == ["truncated.png"]
    assert report.examples["unreadable/corrupt"] == ["corrupt.png"]
    assert report.examples["not an image"] == ["notes.png"]
    assert report.examples["too large"] == ["big.png", "bomb.png"]
    assert report.examples["missing file"] == ["gone.png"]
    assert report.examples["missing caption"] == ["uncaptioned.png"]
    assert report.examples["bad metadata line"] == ["metadata.jsonl line 3 (not a JSON object)"]


def test_summary_line(tmp_path):
    folder_of_bad_files(tmp_path)
    summary = scan_folder(tmp_path, max_pixels=MAX_PIXELS).report.summary()
    assert "\n" not in summary
    assert summary.startswith("10 images: 2 usable, 1 unreadable/corrupt (e.g. corrupt.png), 1 not an image")
    for part in (
        "1 truncated (e.g. truncated.png)",
        "2 too large (over 1,100 pixels) (e.g. big.png, bomb.png)",
        "1 without caption (e.g. uncaptioned.png)",
        "1 listed but missing (e.g. gone.png)",
        "1 bad metadata line (e.g. metadata.jsonl line 3",
        "1 with empty caption",
    ):
        assert part in summary


def test_a_folder_with_nothing_usable_is_an_error_that_says_why(tmp_path):
    (tmp_path / "notes.png").write_text("text")
    (tmp_path / "notes.txt").write_text("a caption for a file that is not an image")
    save(solid(RED), tmp_path / "uncaptioned.png")
    with pytest.raises(UnnoiseError, match="no usable images") as error:
        ImageFolderDataset(tmp_path, resolution=8)
    assert str(tmp_path) in str(error.value)
    assert "2 images: 0 usable, 1 not an image (e.g. notes.png), 1 without caption" in str(error.value)


def test_only_the_decoders_of_accepted_formats_run(tmp_path):
    # Pillow would open this as EPS, whose decoder runs Ghostscript: not for a folder of images.
    (tmp_path / "script.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    (tmp_path / "script.txt").write_text("a caption")
    assert scan_folder(tmp_path).report.skipped == {"not an image": 1}


def test_a_file_broken_after_the_scan_is_an_error_naming_it(tmp_path):
    save(solid(RED), tmp_path / "a.png")
    caption_all(tmp_path)
    dataset = ImageFolderDataset(tmp_path, resolution=8, preload=False)
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(UnnoiseError, match=r"a\.png"):
        dataset[0]


def test_empty_and_missing_folders_are_errors(tmp_path):
    with pytest.raises(UnnoiseError, match=r"no images .* found in .*0 images: 0 usable"):
        ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(UnnoiseError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nowhere", resolution=8)
    with pytest.raises(UnnoiseError, match="image folder not found"):
        scan_folder(tmp_path / "nowhere")


def test_bad_options_are_errors(tmp_path):
    save(solid(RED), tmp_path / "a.png")
    with pytest.raises(UnnoiseError, match="resolution"):
        ImageFolderDataset(tmp_path, resolution=0)
    with pytest.raises(UnnoiseError, match="background"):
        ImageFolderDataset(tmp_path, resolution=8, background=(0, 0, 256))


@pytest.mark.slow
@pytest.mark.skipif(not EMOJI.is_dir(), reason="the emoji data set is not on this machine")
def test_emoji_folder():
    dataset = ImageFolderDataset(EMOJI, resolution=32)
    assert len(dataset) == dataset.report.usable > 3000
    image, caption = dataset[0]
    assert image.shape == (3, 32, 32) and isinstance(caption, str)


# ----------------------------------------------------------------------------- faults of issue 12


def test_sidecars_lose_a_byte_order_mark_and_caption_files_are_read_too(tmp_path):
    save(solid(RED), tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa red square".encode())
    save(solid(BLUE), tmp_path / "b.png")
    (tmp_path / "b.caption").write_text("a blue square")  # kohya-ss's other sidecar
    scan = scan_folder(tmp_path)
    assert sorted(caption for _, caption in scan.items) == ["a blue square", "a red square"]


def test_an_unreadable_caption_is_skipped_and_counted_not_fatal(tmp_path, monkeypatch):
    save(solid(RED), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red")
    save(solid(BLUE), tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("blue")
    read_text = Path.read_text

    def denied(self, *args, **kwargs):  # tests run as root here, where file permissions do not bite
        if self.name == "a.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    scan = scan_folder(tmp_path)
    assert [caption for _, caption in scan.items] == ["blue"]
    assert scan.report.skipped == {"unreadable caption": 1}
    assert scan.report.examples["unreadable caption"] == ["a.txt"]


def test_a_fifo_with_an_image_name_is_skipped_not_waited_on(tmp_path):
    import os

    os.mkfifo(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a pipe")
    save(solid(RED), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("red")
    scan = scan_folder(tmp_path)  # before the fix this blocked for ever on open()
    assert [caption for _, caption in scan.items] == ["red"]
    assert scan.report.skipped == {"not a regular file": 1}


def test_metadata_file_names_stay_inside_the_folder(tmp_path):
    root = tmp_path / "data"
    save(solid(RED), root / "a.png")
    save(solid(BLUE), tmp_path / "secret.png")
    write_jsonl(
        root,
        [
            {"file_name": "a.png", "text": "red"},
            {"file_name": "../secret.png", "text": "outside"},
            {"file_name": str(tmp_path / "secret.png"), "text": "absolute"},
        ],
    )
    scan = scan_folder(root)
    assert [caption for _, caption in scan.items] == ["red"]
    assert scan.report.skipped == {"outside the folder": 2}
    assert "listed outside the folder" in scan.report.summary()


def test_training_reads_the_caption_column_it_is_told(tmp_path):
    """Issue 13: `unnoise train --caption-column`."""
    from unnoise.train.data import open_source

    save(solid(RED), tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text('file_name,text,caption\na.png,ignored,"a red square"\n')
    assert open_source(str(tmp_path), 8, 0, "#ffffff", caption_column="caption").captions == ["a red square"]
    assert open_source(str(tmp_path), 8, 0, "#ffffff").captions == ["ignored"]
