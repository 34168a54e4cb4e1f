"""Data distributions with exact answers, for testing samplers and likelihoods.

A Gaussian mixture with isotropic components, p(x0) = sum_k w_k N(x0; mu_k, s_k^2 I), stays a Gaussian
mixture under noise: p(x; sigma) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I). So everything a diffusion
model approximates is known in closed form:

    ideal denoiser  E[x0 | x; sigma] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
    responsibilities r_k(x) proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I),
    log density, exact samples, and for one component the probability-flow ODE solution.

Each distribution is a denoiser (`dist(x, sigma, cond=None)`), so it plugs into every sampler. Inputs
(B, ...) are flattened to (B, d). Also here: sliced Wasserstein and energy distances between samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class GaussianMixture:
    """sum_k w_k N(mu_k, s_k^2 I) in d dimensions, with its exact denoiser, log density and samples."""

    def __init__(self, means, stds, weights=None, *, dtype=torch.float64):
        self.means = torch.as_tensor(means, dtype=dtype)  # (K, d)
        if self.means.ndim != 2:
            raise ValueError("means must be (K, d)")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=dtype).expand(k).clone()  # (K,)
        weights = torch.ones(k, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        self.weights = weights / weights.sum()  # (K,)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _log_joint(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; mu_k, (s_k^2 + sigma^2) I), shape (B, K), for x (B, d), sigma (B,)."""
        var = self.stds**2 + sigma[:, None] ** 2  # (B, K)
        sq = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # (B, K)
        return self.weights.log() - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def _flat(self, x, sigma):
        x_flat = x.reshape(x.shape[0], -1).to(self.means.dtype)  # (B, d)
        sigma = torch.as_tensor(sigma, dtype=self.means.dtype).expand(x.shape[0])  # (B,)
        return x_flat, sigma

    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log p(x; sigma), the density of x0 + sigma n, in nats. Returns (B,)."""
        x_flat, sigma = self._flat(x, sigma)
        return torch.logsumexp(self._log_joint(x_flat, sigma), dim=1).to(x.dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """The ideal denoiser E[x0 | x0 + sigma n = x], for x (B, ...) and sigma (B,) or scalar."""
        x_flat, sigma = self._flat(x, sigma)
        r = torch.softmax(self._log_joint(x_flat, sigma), dim=1)  # (B, K)
        gain = self.stds**2 / (self.stds**2 + sigma[:, None] ** 2)  # (B, K)
        per_component = self.means[None] + gain[..., None] * (x_flat[:, None] - self.means[None])  # (B, K, d)
        return (r[..., None] * per_component).sum(1).reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p(x; sigma) = (E[x0 | x] - x) / sigma^2."""
        sigma_b = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        return (self.denoise(x, sigma_b) - x) / sigma_b.reshape(-1, *[1] * (x.ndim - 1)) ** 2

    def sample(self, n: int, generator: torch.Generator | None = None, sigma: float = 0.0) -> torch.Tensor:
        """n exact samples of x0 + sigma n, shape (n, d)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        std = (self.stds[k] ** 2 + sigma**2).sqrt()[:, None]  # (n, 1)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[k] + std * z

    @property
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    @property
    def covariance(self) -> torch.Tensor:
        """Cov[x0] = sum_k w_k (s_k^2 I + mu_k mu_k^T) - mean mean^T, (d, d)."""
        eye = torch.eye(self.dim, dtype=self.means.dtype)
        second = sum(
            w * (s**2 * eye + torch.outer(m, m))
            for w, s, m in zip(self.weights, self.stds, self.means, strict=True)
        )
        return second - torch.outer(self.mean, self.mean)


class Gaussian(GaussianMixture):
    """N(mu, s^2 I): a one-component mixture whose probability-flow ODE has a closed-form solution."""

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: float, *, dtype=torch.float64):
        super().__init__(torch.as_tensor(mean, dtype=dtype)[None], [std], dtype=dtype)

    def ode_solution(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact probability-flow ODE map from sigma_from to sigma_to.

        D is linear in x for a Gaussian: x - mu is scaled by sqrt((s^2 + sigma_to^2) / (s^2 + sigma_from^2)).
        """
        s2 = float(self.stds[0]) ** 2
        mu = self.means[0].reshape(1, *x.shape[1:]).to(x.dtype)
        return mu + (x - mu) * math.sqrt((s2 + sigma_to**2) / (s2 + sigma_from**2))


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, *, projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 2-Wasserstein distance between equal-size sample sets a, b of shape (n, d)."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a.shape != b.shape:
        raise ValueError(f"sample sets must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)  # (d, P)
    pa, _ = (a @ directions).sort(0)  # (n, P)
    pb, _ = (b @ directions).sort(0)
    return float(((pa - pb) ** 2).mean().sqrt())


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance 2 E|a - b| - E|a - a'| - E|b - b'| (Szekely & Rizzo 2013); 0 iff equal in law."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def example_mixture(dim: int = 2) -> GaussianMixture:
    """A small, well-separated, unequal-weight mixture used across tests and benchmarks."""
    means = torch.zeros(3, dim, dtype=torch.float64)
    means[0, 0], means[1, 0], means[2, 1] = -1.5, 1.5, 1.2
    return GaussianMixture(means, stds=[0.3, 0.5, 0.2], weights=[0.5, 0.3, 0.2])
