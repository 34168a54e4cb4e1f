"""Building blocks of the denoising network: noise embedding, residual blocks, attention, resampling.

One attention for everything (`Attention`, through `scaled_dot_product_attention`): self-attention over
pixels and cross-attention from pixels to text tokens differ only in where keys and values come from.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class NetworkConfigBase:
    """What every network config (a frozen dataclass with a `kind`) shares: its release JSON and back."""

    kind: ClassVar[str]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict):
        """Known fields only (a release may carry more); JSON lists back to the tuples they were. Each value
        is checked against what training could have written (FIELD_LIMITS) before anything is built: a
        resolution of 1,000,000 would pass the weights' shapes and then allocate terabytes (issue 31)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
        for name, value in known.items():
            check_field(name, value)
        return cls(**known)


# The range of every whole-number field of a network config (a tuple field: of each of its entries).
FIELD_LIMITS = {
    "resolution": (4, 4096), "in_channels": (1, 64), "latent_channels": (1, 64), "channels": (1, 4096),
    "channel_mult": (1, 64), "blocks_per_level": (1, 16), "attention_levels": (0, 8),
    "self_attention_levels": (0, 8), "head_channels": (1, 4096), "text_dim": (1, 8192),
    "text_layers": (0, 32), "patch": (1, 16), "width": (1, 8192), "depth": (1, 128), "mlp_ratio": (1, 16),
}  # fmt: skip


def check_field(name: str, value) -> None:
    """ValueError naming the field unless its value is of its kind and within FIELD_LIMITS."""
    if isinstance(value, bool) or name == "dropout":
        if name == "dropout" and not (isinstance(value, int | float) and 0 <= value < 1):
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        return
    if name not in FIELD_LIMITS:
        return
    low, high = FIELD_LIMITS[name]
    entries = value if isinstance(value, tuple) else (value,)
    if isinstance(value, tuple) and len(value) > 8:
        raise ValueError(f"{name} has {len(value)} entries; at most 8")
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, int) or not low <= entry <= high:
            raise ValueError(f"{name} must be whole numbers in {low}..{high}, got {value!r}")


@functools.cache
def sincos_positions(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows * cols, dim) fixed 2-D positions: half the channels encode the row, half the column, each
    as sines and cosines at dim / 4 geometric frequencies (periods 2 pi to 2 pi 10^4 patches). Cached per
    size, so every forward reads the same tensor: never write to it."""
    quarter = dim // 4
    freqs = 1e-4 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)

    def encode(coordinate: torch.Tensor) -> torch.Tensor:
        angles = coordinate[:, None] * freqs[None]  # (n, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (n, dim/2)

    with torch.inference_mode(False):  # a cached tensor made under inference mode could not train later
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        return torch.cat([encode(y.flatten().double()), encode(x.flatten().double())], dim=1).float()


@functools.cache
def fractional_positions(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows * cols, dim) fixed 2-D positions in fractions of the image, so a place has the same code at
    every resolution: half the channels for the row, half for the column, each cos(pi k u) and sin(pi k u)
    for k = 1 .. dim / 4, with u = (index + 0.5) / size in (0, 1). k = 1 falls once from one side to the
    other, so left against right (or top against bottom) is a single direction. Cached: never write to it."""
    quarter = dim // 4
    k = torch.arange(1, quarter + 1, dtype=torch.float64) * math.pi  # (dim/4,)

    def encode(size: int) -> torch.Tensor:
        u = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # (size,)
        return torch.cat([(u[:, None] * k).cos(), (u[:, None] * k).sin()], dim=1)  # (size, dim/2)

    with torch.inference_mode(False):
        row, col = encode(rows), encode(cols)  # (rows, dim/2), (cols, dim/2)
        grid = torch.cat([row[:, None].expand(-1, cols, -1), col[None].expand(rows, -1, -1)], dim=2)
        return torch.nn.functional.pad(grid.reshape(rows * cols, -1), (0, dim - 4 * quarter)).float()


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with groups of 16 channels (at most 32 groups; Wu & He 2018 found 16 to 32 per group fine).

    Few, large groups also matter for speed: PyTorch's channels-last bf16 GroupNorm on a CPU measured 7x
    slower with groups of 4 channels than with groups of 16 (benchmarks/train_throughput.py --profile).
    """
    groups = max(g for g in range(1, 33) if g == 1 or (channels % g == 0 and channels // g >= 16))
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Start a residual branch at zero, so every block begins as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PerImageLinear(nn.Linear):
    """A Linear on per-image vectors (B, D_in) -> (B, D_out) that, outside training, computes each row alone.

    BLAS libraries choose their kernel by the number of rows (MKL on an AMD EPYC: one kernel for 1 row,
    another for 2-3, a third for 4 and more) and the kernels round differently, so a batched product
    would make an image's noise embedding depend on how many images share its batch. One matrix-vector
    product per row cannot (tests/test_batch_invariance.py). Training keeps the single batched product.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or x.ndim != 2:
            return super().forward(x)
        return torch.stack([F.linear(row, self.weight, self.bias) for row in x])  # (B, D_out)


class NoiseEmbedding(nn.Module):
    """c_noise (B,) -> (B, dim): sinusoids at log-spaced frequencies, then an MLP.

    The frequencies span 0.005 to 50 radians per unit so that the same network serves c_noise of every
    formulation: EDM's log(sigma) / 4 (a few units) as well as VP's 999 t.
    """

    def __init__(self, dim: int, frequencies: int = 64):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(math.log10(0.005), math.log10(50.0), frequencies))
        self.mlp = nn.Sequential(PerImageLinear(2 * frequencies, dim), nn.SiLU(), PerImageLinear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise.float()[:, None] * self.freqs[None]  # (B, F)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the embedding as a per-channel scale and shift (adaptive GroupNorm)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = PerImageLinear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) queries and (B, heads, T, d) keys and values.

    `scaled_dot_product_attention` everywhere except bf16 on a CPU, where its kernels measured 1.8x to
    7.6x slower than the explicit product for our sizes (benchmarks/attention.py; in fp32 SDPA wins).
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T), True = attend
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attention_probabilities(q, k, key_mask) @ v


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, key_mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) (B, heads, N, T): where each query looks; key_mask (B, T), True = attend."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, heads, N, T)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


# gamma below: 1 shares the nouns' attention in proportion; 2, 8 and 32 measured alike on shapes-32
# (benchmarks/diagnoses/results/attention_steering.md)
BINDING_SHARPNESS = 1.0


def bind_attention(probabilities: torch.Tensor, phrases: torch.Tensor) -> torch.Tensor:
    """Attribute binding: each pixel's attention to the nouns, redistributed by its attention to their
    attributes. probabilities (B, heads, N, T); phrases (B, T) codes of `text.phrases.attribute_phrases`
    (g: an attribute of phrase g, -g: its noun, 0: neither). For rows with two phrases or more:

        m_g(u) = sum of A(u, t) over phrase g's attributes
        s_g(u) = softmax_g(gamma log m_g(u))
        A'(u, t) = [sum of A(u, t') over every phrase's noun t'] s_g(u) A(u, t) / [sum over phrase g's noun]

    for t a piece of phrase g's noun; every other token keeps its attention, so each row still sums to 1.
    A pixel that reads "red" more than "blue" reads "circle" rather than "square" in "a red circle and a
    blue square". Training never does this; it is an edit at inference (see
    benchmarks/diagnoses/attention_steering.py).
    """
    count = int(phrases.max()) if phrases.numel() else 0
    if count < 2:
        return probabilities
    g = torch.arange(1, count + 1, device=phrases.device)
    attribute = (phrases[:, :, None] == g).float()  # (B, T, G)
    noun = (phrases[:, :, None] == -g).float()  # (B, T, G)
    present = (attribute.sum(1) > 0) & (noun.sum(1) > 0)  # (B, G): the phrase has both
    bound = present.sum(1) >= 2  # (B,): rows the edit applies to
    p = probabilities.float()
    attribute_mass = torch.einsum("bhnt,btg->bhng", p, attribute)  # (B, heads, N, G)
    noun_mass = torch.einsum("bhnt,btg->bhng", p, noun)  # (B, heads, N, G)
    logits = BINDING_SHARPNESS * attribute_mass.clamp_min(1e-12).log()
    share = logits.masked_fill(~present[:, None, None, :], float("-inf")).softmax(-1)
    share = torch.nan_to_num(share)  # rows with no phrase: all -inf, their factors are not used
    total = (noun_mass * present[:, None, None, :]).sum(-1, keepdim=True)  # (B, heads, N, 1)
    factor = total * share / noun_mass.clamp_min(1e-12)  # (B, heads, N, G)
    token_factor = torch.einsum("bhng,btg->bhnt", factor, noun)  # (B, heads, N, T)
    edited = (noun * present[:, None, :]).sum(-1) > 0  # (B, T): nouns of phrases that take part
    edited = edited & bound[:, None]
    scaled = torch.where(edited[:, None, None, :], p * token_factor, p)
    return scaled.to(probabilities.dtype)


class Attention(nn.Module):
    """Multi-head attention from queries (B, N, C) to a context (B, T, C_ctx), optional key mask (B, T)."""

    def __init__(
        self, channels: int, context_dim: int | None = None, head_channels: int = 32, *, qk_norm: bool = False
    ):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        context_dim = context_dim or channels
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(context_dim, 2 * channels, bias=False)
        self.out = zero_init(nn.Linear(channels, channels))
        # RMS-normalised queries and keys per head (Dehghani et al. 2023): attention logits stay bounded,
        # which keeps bf16 training stable at higher learning rates
        self.q_norm = nn.RMSNorm(channels // self.heads, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(channels // self.heads, eps=1e-6) if qk_norm else None
        # while a list (train/grounding.recorded_cross_attention): each forward appends where its queries
        # look, (B, N, T) averaged over heads and before any binding, from the same product it attends with
        self.recorded: list[torch.Tensor] | None = None

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask=None, *, phrases=None
    ) -> torch.Tensor:
        """With `phrases` (B, T), the context's attribute phrases, its attention is bound (bind_attention)."""
        q, k, v = self.heads_of(x, x if context is None else context)
        if phrases is None and self.recorded is None:
            h = attention(q, k, v, key_mask)  # (B, heads, N, c / heads)
        else:
            probabilities = attention_probabilities(q, k, key_mask)  # (B, heads, N, T)
            if self.recorded is not None:
                self.recorded.append(probabilities.mean(1))
            if phrases is not None:
                probabilities = bind_attention(probabilities, phrases).to(v.dtype)
            h = probabilities @ v
        return self.out(h.transpose(1, 2).reshape(x.shape))

    def heads_of(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries (B, heads, N, d) from x (B, N, C); keys and values (B, heads, T, d) from the context."""
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class TransformerBlock(nn.Module):
    """Self-attention over pixels (optional), cross-attention to the text tokens, and an MLP, pre-normed.

    With `query_positions` the cross-attention's queries also get each pixel's `fractional_positions`
    (as DETR adds positions to its queries at every layer): a word can be read more in one part of the
    image than another from the first step, instead of only after the features have learned where they are.
    """

    def __init__(
        self,
        channels: int,
        text_dim: int,
        head_channels: int = 32,
        mlp_ratio: int = 2,
        *,
        self_attention: bool = True,
        query_positions: bool = False,
    ):
        super().__init__()
        self.query_positions = query_positions
        self.norm_self = nn.LayerNorm(channels) if self_attention else None
        self.self_attention = Attention(channels, head_channels=head_channels) if self_attention else None
        self.norm_cross = nn.LayerNorm(channels)
        self.cross_attention = Attention(channels, text_dim, head_channels=head_channels)
        self.norm_mlp = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, mlp_ratio * channels),
            nn.GELU(approximate="tanh"),
            zero_init(nn.Linear(mlp_ratio * channels, channels)),
        )

    def forward(self, x: torch.Tensor, text=None) -> torch.Tensor:
        b, c, height, width = x.shape
        h = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.self_attention is not None:
            h = h + self.self_attention(self.norm_self(h))
        if text is not None:
            queries = self.norm_cross(h)  # (B, H*W, C)
            if self.query_positions:
                queries = queries + fractional_positions(height, width, c).to(h)
            h = h + self.cross_attention(queries, text.tokens, text.mask, phrases=text.phrases)
        h = h + self.mlp(self.norm_mlp(h))
        return h.transpose(1, 2).reshape(b, c, height, width)


class TextRefiner(nn.Module):
    """Trainable pre-norm self-attention layers over the frozen encoder's token states (B, T, D), key mask
    (B, T). Zero-initialised outputs: with no training it passes the tokens through unchanged."""

    def __init__(self, width: int, layers: int, head_channels: int = 32, mlp_ratio: int = 2):
        super().__init__()
        self.attention_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.attentions = nn.ModuleList(
            Attention(width, head_channels=head_channels, qk_norm=True) for _ in range(layers)
        )
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(
                nn.Linear(width, mlp_ratio * width),
                nn.GELU(approximate="tanh"),
                zero_init(nn.Linear(mlp_ratio * width, width)),
            )
            for _ in range(layers)
        )

    def zeroed(self) -> list[nn.Module]:
        """The output projections that start at zero (for an initialiser that must leave them so)."""
        return [a.out for a in self.attentions] + [m[-1] for m in self.mlps]

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = tokens
        for attention_norm, attention, mlp_norm, mlp in zip(
            self.attention_norms, self.attentions, self.mlp_norms, self.mlps, strict=True
        ):
            h = h + attention(attention_norm(h), key_mask=mask)
            h = h + mlp(mlp_norm(h))
        return h * mask.unsqueeze(-1).to(h.dtype)  # (B, T, D), padding kept at exactly 0


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
