"""Token grounding: a loss that teaches cross-attention which pixels each word of a caption belongs to.

After TokenCompose (Wang et al., CVPR 2024). A model that reads "a red circle and a blue square" as a bag of
words draws red, blue, circle and square and pairs them by chance;
`benchmarks/diagnoses/binding_diagnosis.py` shows the shipped shapes-32's pixels attending to their own
colour word but to both shape words alike. Where the data set knows where each word is (the built-in
shapes: every colour and shape word covers the objects it names, `data.shapes.word_masks`), each
cross-attention map of a grounded token is pushed inside its pixels:

    inside(t) = sum_u A(u, t) M_t(u) / sum_u A(u, t)        A: attention (B, N, T), heads averaged
    L_ground  = mean over grounded tokens and attention layers of (1 - inside(t))^2

with M_t the word's coverage box-filtered to each layer's N = side x side pixels. The run's loss is the
diffusion loss plus `grounding_weight` x L_ground; the network itself is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..nn.layers import TransformerBlock


def token_masks(
    word_masks: list[dict[str, torch.Tensor]], tokens: list[list[str]], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each caption token's coverage (B, T, R, R) and (B, T) True where the token names something, for
    captions tokenised as `tokens` (padded to `length`): a token is grounded when it is a word with a mask."""
    resolution = next((m.shape[-1] for each in word_masks for m in each.values()), 1)
    masks = torch.zeros(len(word_masks), length, resolution, resolution)
    for b, (words, pieces) in enumerate(zip(word_masks, tokens, strict=True)):
        for t, piece in enumerate(pieces[:length]):
            if piece in words:
                masks[b, t] = words[piece]
    return masks, masks.flatten(2).amax(-1) > 0


def cross_attention_blocks(network: torch.nn.Module) -> list[tuple[str, TransformerBlock]]:
    """(name, block) of every block of `network` whose cross-attention reads the text, in forward order."""
    return [(name, m) for name, m in network.named_modules() if isinstance(m, TransformerBlock)]


@contextlib.contextmanager
def recorded_cross_attention(network: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, every cross-attention of `network` appends where its pixels look, (B, N, T) averaged
    over heads, to the list yielded (with gradients: the loss trains the queries and keys). The maps are
    the probabilities the attention itself multiplies its values with, computed once."""
    maps: list[torch.Tensor] = []
    attentions = [block.cross_attention for _, block in cross_attention_blocks(network)]
    for attention in attentions:
        attention.recorded = maps
    try:
        yield maps
    finally:
        for attention in attentions:
            attention.recorded = None


def grounding_loss(maps: list[torch.Tensor], masks: torch.Tensor, grounded: torch.Tensor) -> torch.Tensor:
    """Mean (1 - inside)^2 over the grounded tokens of every map (B, N, T); masks (B, T, R, R), grounded
    (B, T). 0 when no token is grounded (captions dropped or naming nothing)."""
    if not maps or not grounded.any():
        return masks.new_zeros(())
    losses = []
    for attention in maps:
        b, n, t = attention.shape
        side = round(n**0.5)
        coverage = F.adaptive_avg_pool2d(masks[:, :t].flatten(0, 1)[:, None], side)  # (B T, 1, side, side)
        coverage = coverage.view(b, t, n).transpose(1, 2).to(attention)  # (B, N, T)
        inside = (attention * coverage).sum(1) / attention.sum(1).clamp_min(1e-8)  # (B, T)
        losses.append(((1 - inside) ** 2)[grounded[:, :t]])
    return torch.cat(losses).mean()
