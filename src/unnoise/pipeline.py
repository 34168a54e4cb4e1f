"""Load a released model and generate images from text: the one library call every edge adapts.

    pipe = unnoise.load("path/to/model")        # a release folder: model.safetensors + config.json
    images = pipe.generate("a red circle", seed=1, num_images=4)

Image i of a request uses seed + i with its own generator (for its starting noise and any fresh noise the
sampler draws), so a seed gives the same image whatever the number of images asked for. Each image
carries its parameters in a PNG `parameters` text chunk, in AUTOMATIC1111's format.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .diffusion.denoiser import Denoiser
from .diffusion.formulations import FORMULATIONS
from .diffusion.guidance import cfg
from .diffusion.samplers import Step, get_sampler, sample
from .diffusion.schedules import default_sigmas
from .errors import UnnoiseError
from .images import to_pil
from .nn.unet import UNet, UNetConfig
from .release import load_release
from .text.encoders import CachedTextEncoder, load_text_encoder

MODELS_DIR = Path(__file__).resolve().parent / "models"  # models shipped inside the package


@dataclass(frozen=True)
class Request:
    """Everything that determines a generated image; written into and read back from its PNG."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "dpmpp_2m"
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    width: int = 32
    height: int = 32
    model: str = ""

    def parameters(self) -> str:
        """AUTOMATIC1111's `parameters` text: prompt, negative prompt line, then key: value pairs."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.guidance:g}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Model: {self.model}"
        )
        return "\n".join(lines)

    @classmethod
    def from_parameters(cls, text: str) -> Request:
        """Parse the `parameters` text written by `parameters()` (or by AUTOMATIC1111, for these keys)."""
        lines = text.strip().splitlines()
        if not lines or not lines[-1].startswith("Steps:"):
            raise UnnoiseError("the PNG's parameters do not end with a 'Steps: ...' line")
        values = dict(re.findall(r"\s*([\w ]+):\s*([^,]*)", lines[-1]))
        negative = [ln for ln in lines[:-1] if ln.startswith("Negative prompt:")]
        prompt = "\n".join(ln for ln in lines[:-1] if not ln.startswith("Negative prompt:"))
        width, height = (int(v) for v in values.get("Size", "32x32").split("x"))
        try:
            return cls(
                prompt=prompt,
                negative_prompt=negative[0].removeprefix("Negative prompt:").strip() if negative else "",
                sampler=values.get("Sampler", "dpmpp_2m").strip(),
                steps=int(values["Steps"]),
                guidance=float(values.get("CFG scale", 3.0)),
                seed=int(values["Seed"]),
                width=width,
                height=height,
                model=values.get("Model", "").strip(),
            )
        except (KeyError, ValueError) as error:
            raise UnnoiseError(f"the PNG's parameters are incomplete or malformed ({error})") from None


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save with the image's `parameters` text chunk, written to a temporary name and renamed."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    tmp = path.with_name(f".tmp-{path.name}")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def read_png_parameters(path: str | Path) -> Request:
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except (OSError, ValueError) as error:
        raise UnnoiseError(f"cannot read {path}: {error}") from None
    if not text:
        raise UnnoiseError(f"{path} carries no 'parameters' text chunk")
    return Request.from_parameters(text)


class Pipeline:
    """A released model ready to generate: its denoiser, its text encoder and its name."""

    def __init__(self, denoiser: Denoiser, text: CachedTextEncoder, resolution: int, name: str):
        self.denoiser, self.text, self.resolution, self.name = denoiser, text, resolution, name

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        guidance: float = 3.0,
        seed: int | None = None,
        num_images: int = 1,
        callback: Callable[[Step], None] | None = None,
        **options,
    ) -> list[Image.Image]:
        """num_images images for the prompt; image i uses seed + i. Each PNG keeps its parameters."""
        get_sampler(sampler)
        if not isinstance(prompt, str):
            raise UnnoiseError("the prompt must be a string")
        if not 1 <= steps <= 1000 or not 1 <= num_images <= 64:
            raise UnnoiseError(
                f"steps must be in 1..1000 and num_images in 1..64, got {steps} and {num_images}"
            )
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
        r, device = self.resolution, next(self.denoiser.parameters()).device
        noise = torch.stack([torch.randn(3, r, r, generator=g) for g in generators]).to(
            device
        )  # (N, 3, R, R)
        cond = self.text.encode([prompt] * num_images).to(device)
        uncond = self.text.encode([negative_prompt] * num_images).to(device)
        denoiser = cfg(self.denoiser, guidance, uncond)
        sigmas = default_sigmas(self.denoiser.formulation, steps)
        with torch.no_grad():
            x = sample(
                denoiser,
                noise,
                sigmas,
                sampler=sampler,
                cond=cond,
                generator=generators,
                callback=callback,
                **options,
            )
        images = to_pil(x)
        for i, image in enumerate(images):
            request = Request(prompt, negative_prompt, sampler, steps, guidance, seed + i, r, r, self.name)
            image.info["parameters"] = request.parameters()
        return images


def resolve_model(name_or_path: str | Path) -> Path:
    """A release folder: a path as given, or the name of a model shipped in the package."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    shipped = MODELS_DIR / str(name_or_path)
    if (shipped / "config.json").is_file():
        return shipped
    available = (
        sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())
        if (MODELS_DIR.is_dir())
        else []
    )
    raise UnnoiseError(
        f"no model {str(name_or_path)!r}: not a folder with config.json, nor a shipped model"
        f" (shipped: {', '.join(available) or 'none yet'})"
    )


def load(name_or_path: str | Path, *, device: str = "cpu") -> Pipeline:
    """Load a released model (safetensors + config.json) with its text encoder; nothing is unpickled."""
    folder = resolve_model(name_or_path)
    weights, config = load_release(folder)
    unet_config = UNetConfig.from_dict(config["unet"])
    network = UNet(unet_config)
    try:
        network.load_state_dict(weights)
    except RuntimeError as error:
        raise UnnoiseError(
            f"{folder}: the weights do not match config.json ({str(error).splitlines()[0]})"
        ) from None
    if torch.device(device).type == "cpu":  # the layout PyTorch's CPU convolutions are fastest in
        network = network.to(memory_format=torch.channels_last)
    formulation = FORMULATIONS[config["formulation"]]
    denoiser = Denoiser(network.eval().requires_grad_(False), formulation).to(device)
    encoder = config["text_encoder"]
    text = CachedTextEncoder(
        load_text_encoder(encoder["name"], device=device, max_tokens=encoder["max_tokens"])
    )
    return Pipeline(denoiser, text, unet_config.resolution, name=folder.name)
