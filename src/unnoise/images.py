"""Images in and out: model tensors in [-1, 1] <-> Pillow images, image and mask files, PNGs that carry
their settings, resizing and the masked area of an inpainting, contact sheets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .data.folder import limit_png_text
from .errors import UnnoiseError
from .settings import ImageSettings


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images (values outside [-1, 1] are clipped)."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]  # (H, W, 3) each


def from_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    """B RGB images of one size -> (B, 3, H, W) in [-1, 1]; `to_pil` gives the same pixels back."""
    import numpy as np

    pixels = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))  # (B, H, W, 3)
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


def contact_sheet(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    *,
    scale: int = 1,
    columns: int | None = None,
) -> Image.Image:
    """A grid of equally sized images, each optionally enlarged (nearest) and captioned below."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].width * scale, images[0].height * scale
    label = 14 if captions else 0
    sheet = Image.new("RGB", (columns * width, rows * (height + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, image in enumerate(images):
        x, y = (k % columns) * width, (k // columns) * (height + label)
        sheet.paste(image.resize((width, height), Image.NEAREST), (x, y))
        if captions:
            draw.text((x + 2, y + height + 1), captions[k][: max(4, width // 6)], fill="black")
    return sheet


# --- PNGs that carry their settings ------------------------------------------------------------------


def _png_text(image: Image.Image):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    return info


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save with the image's `parameters` text chunk, written to a temporary name and renamed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        image.save(tmp, format="PNG", pnginfo=_png_text(image))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
    return path


def png_bytes(image: Image.Image) -> bytes:
    """The PNG file of an image, its `parameters` text chunk included."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_text(image))
    return buffer.getvalue()


def read_png_parameters(path: str | Path) -> ImageSettings:
    return ImageSettings.from_parameters(read_png_text(path))


def read_png_text(path: str | Path) -> str:
    """The `parameters` text chunk of a PNG (ours or AUTOMATIC1111's)."""
    regular_file(path, "PNG")
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except (OSError, ValueError) as error:
        raise UnnoiseError(f"cannot read {path}: {error}") from None
    if not text:
        raise UnnoiseError(f"{path} carries no 'parameters' text chunk")
    return text


# --- image files in and out ------------------------------------------------------------------------------


def open_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB image from a Pillow image or a file of any mode (transparency over white)."""
    image = _read(image, "image")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_mask(mask: Image.Image | str | Path) -> Image.Image:
    """A mask as 8-bit grey, any mode in: white (255) = regenerate, black (0) = keep."""
    return _read(mask, "mask").convert("L")


limit_png_text()  # bounded PNG text for every image this module opens (data.folder.PNG_TEXT_CHUNK)


def regular_file(path: str | Path, what: str) -> None:
    """An UnnoiseError unless `path` is missing or a regular file: a FIFO or a device would block a read
    for ever (issue 31), a folder cannot be read as an image."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe, socket or device)"
        raise UnnoiseError(f"the {what} {path} is {kind}: give an image file")


def _read(image: Image.Image | str | Path, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    regular_file(image, what)
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnnoiseError(f"cannot read the {what} {image}: {error}") from None


def fit(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """The image resized (stretched) to size x size or (width, height); itself when it already fits."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if image.size == size:
        return image
    resized = image.resize(size, Image.LANCZOS)
    resized.info.update(image.info)
    return resized


def masked_area(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """A square (left, top, right, bottom) around the mask's white pixels with `padding` pixels beside
    them, moved inside the image (and cut to it when the image is smaller); None for an empty mask."""
    bbox = mask.getbbox()
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    side = max(right - left, bottom - top) + 2 * padding
    box = []
    for low, high, size in ((left, right, mask.width), (top, bottom, mask.height)):
        length = min(side, size)
        start = min(max(0, (low + high - length) // 2), size - length)
        box.append((start, start + length))
    (x0, x1), (y0, y1) = box
    return x0, y0, x1, y1


def with_info(image: Image.Image, info: dict) -> Image.Image:
    image.info.update(info)
    return image


# --- how alike two batches of images are ------------------------------------------------------------


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), per image (B,)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image (B,): 11x11 Gaussian windows of sigma 1.5, on
    [0, 1] pixels, mean over channels and positions (the windows that fit inside the image)."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    C = x.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float32) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(C, 1, 11, 11).to(x.device)  # (C, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(1)
