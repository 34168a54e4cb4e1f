"""The one denoiser interface: a network F joined to a formulation gives D(x, sigma, cond) -> x0_hat."""

from __future__ import annotations

from typing import Any

import torch

from .formulations import Formulation
from .tensors import append_dims


class Denoiser(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, cond) (Karras et al. 2022, eq. 7).

    `network(x_in (B, ...), c_noise (B,), cond) -> F (B, ...)` never sees the formulation; samplers call
    this module with x = x0 + sigma n (B, ...) and sigma (B,).

    An image's result does not depend on its batch (tests/test_batch_invariance.py). On a CPU, PyTorch
    convolves a batch of one with another kernel than larger batches, which rounds differently, so outside
    training a lone image is evaluated as a batch of two (itself twice), the kernel every batch uses.
    """

    def __init__(self, network: torch.nn.Module, formulation: Formulation):
        super().__init__()
        self.network = network
        self.formulation = formulation

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if len(x) == 1 and x.device.type == "cpu" and not torch.is_grad_enabled():
            return self(x.expand(2, *x.shape[1:]), sigma.expand(2), paired(cond))[:1]
        c_skip, c_out, c_in, c_noise = self.formulation.scalings(sigma)
        output = self.network(append_dims(c_in, x.ndim) * x, c_noise, cond)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * output.to(x.dtype)

    def loss(
        self,
        x0: torch.Tensor,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        cond: Any = None,
        *,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample lambda(sigma) ||D(x0 + sigma n; sigma) - x0||^2, averaged over pixels: (B,).

        lambda is the formulation's own weight unless `weight` (B,) is given (e.g. `min_snr_weight`).
        """
        x = x0 + append_dims(sigma, x0.ndim) * noise
        error = (self(x, sigma, cond) - x0) ** 2  # in x0.dtype: D casts the network output back
        weight = self.formulation.loss_weight(sigma) if weight is None else weight
        return weight * error.flatten(1).mean(1)


def paired(cond: Any) -> Any:
    """A batch-of-one condition repeated to two rows (tensors and objects that index like them)."""
    return None if cond is None else cond[[0, 0]]


def min_snr_weight(sigma: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023) on the x0 error: min(SNR, gamma) with SNR = 1 / sigma^2.

    On the noise-prediction error this is the paper's min(SNR, gamma) / SNR.
    """
    return torch.clamp(sigma**-2, max=gamma)
