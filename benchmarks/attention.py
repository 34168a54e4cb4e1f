"""Attention on a CPU: `scaled_dot_product_attention` against the explicit softmax(q k^T / sqrt(d)) v.

For the shapes of the `small` UNet at batch 64 (self-attention over 8x8 and 16x16 pixels, cross-attention
to 16 text tokens with a mask), forward + backward, median of 5 after 2 warm-up calls, fp32 and bf16.
`unnoise.nn.layers.attention` takes the explicit product for bf16 on a CPU because of this table.

Run: .venv/bin/python benchmarks/attention.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (batch, heads, queries, keys, head dim, masked)
    "self 8x8, 4 heads": (64, 4, 64, 64, 32, False),
    "self 16x16, 2 heads": (64, 2, 256, 256, 32, False),
    "cross 16x16 -> 16 tokens": (64, 2, 256, 16, 32, True),
    "cross 8x8 -> 16 tokens": (64, 4, 64, 16, 32, True),
}


def explicit(q, k, v, mask):
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, heads, N, T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def milliseconds(fn, shape, dtype) -> float:
    b, h, n, t, d, masked = shape
    q = torch.randn(b, h, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, t, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, t, d, dtype=dtype, requires_grad=True)
    mask = torch.rand(b, 1, 1, t) < 0.8 if masked else None
    if mask is not None:
        mask[..., 0] = True
    times = []
    for i in range(7):
        start = time.perf_counter()
        fn(q, k, v, mask).float().sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; forward + backward, ms")
    print("| shape | dtype | sdpa | explicit | sdpa / explicit |")
    print("|---|---|---:|---:|---:|")
    for name, shape in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            a, b = milliseconds(sdpa, shape, dtype), milliseconds(explicit, shape, dtype)
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {a:.1f} | {b:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
