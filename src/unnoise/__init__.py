"""unnoise: text-to-image diffusion you can train on a laptop, with samplers verified against exact answers.

The public names are imported lazily, so `import unnoise` (and the CLI) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "sample": "unnoise.diffusion.samplers",
    "SAMPLERS": "unnoise.diffusion.samplers",
    "Step": "unnoise.diffusion.samplers",
    "get_sampler": "unnoise.diffusion.samplers",
    "log_likelihood": "unnoise.diffusion.likelihood",
    "bits_per_dim": "unnoise.diffusion.likelihood",
    "FORMULATIONS": "unnoise.diffusion.formulations",
    "Formulation": "unnoise.diffusion.formulations",
    "Denoiser": "unnoise.diffusion.denoiser",
    "schedules": "unnoise.diffusion.schedules",
    "formulations": "unnoise.diffusion.formulations",
    "testing": "unnoise.testing",
    "UnnoiseError": "unnoise.errors",
    "load": "unnoise.pipeline",
    "Pipeline": "unnoise.pipeline",
    "ImageSettings": "unnoise.settings",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from . import testing
    from .diffusion import formulations, schedules
    from .diffusion.denoiser import Denoiser
    from .diffusion.formulations import FORMULATIONS, Formulation
    from .diffusion.likelihood import bits_per_dim, log_likelihood
    from .diffusion.samplers import SAMPLERS, Step, get_sampler, sample
    from .errors import UnnoiseError
    from .pipeline import Pipeline, load
    from .settings import ImageSettings


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'unnoise' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
