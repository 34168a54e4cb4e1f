"""Conversions between model tensors in [-1, 1] and Pillow images, and contact sheets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw


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
