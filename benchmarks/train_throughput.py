"""Training throughput on a CPU: our `small` UNet against a diffusers UNet2DConditionModel of the same shape.

One training step, for both models: forward, MSE of the output against a random target, backward, AdamW
step (lr 2e-4, betas (0.9, 0.99), weight decay 0: TrainConfig's defaults), batch 64 at 32x32, a text
condition of 16 tokens of dimension 384 (random, right-padded to random lengths 4..16, zero where masked)
with its mask and pooled vector, noise levels uniform in [0, 999). No EMA, no gradient clipping, no data
loading: the network and its optimizer only. Every configuration (model x precision x memory layout) runs
in a fresh subprocess, one after another, so that neither its speed nor its memory depends on what ran
before it: `--warmup` untimed steps, then the median of `--steps` timed steps; images/s = batch / median.
Precisions: fp32, and bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`, weights and optimizer
in fp32, as `unnoise.train.loop` does). Layouts: channels_last (what our training loop uses on a CPU; model
and images converted) and contiguous (diffusers' default).

Memory: the peak resident set size of the subprocess (VmHWM, not `ru_maxrss`, which on Linux carries the
parent's peak into a subprocess; see `peak_rss_mib`). It includes the Python interpreter, torch and, for
diffusers, its import, so the table also gives the peak minus the RSS just before the first step (weights,
inputs and the optimizer are allocated by then, AdamW's moments are not): what the training steps added.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of each model (matmuls,
convolutions, attention; elementwise work, normalisation and the optimizer step are not counted). CPU
attention runs `_scaled_dot_product_flash_attention_for_cpu`, which the counter does not know, so it is
counted here with torch's own SDPA formulas. Achieved GFLOP/s = counted FLOPs / median step time, printed
next to the machine's `torch.mm` rate on 2048 x 2048 matrices in the same precision.

The diffusers model, derived from our preset by `diffusers_config` (the mapping, key by key):
  block_out_channels   our widths, channels * channel_mult = (32, 64, 128)
  layers_per_block     our blocks_per_level = 2 (up blocks get 3 resnets, as ours do)
  down/up block types  CrossAttn*Block2D at our attention_levels (1, 2), plain Down/UpBlock2D at level 0;
                       the mid block is UNetMidBlock2DCrossAttn (resnet, self + cross attention, resnet),
                       like our middle
  only_cross_attention True where we have cross- but no self-attention (level 1, 16x16): diffusers cannot
                       drop self-attention, only replace it by a second cross-attention (it attends to
                       the tokens without the mask), which is far cheaper than self-attention over 256
                       pixels and so the conservative choice; False at level 2 (self + cross, as ours)
  attention_head_dim   (1, 2, 4): this diffusers argument is the number of heads (their issue #2011),
                       width // our head_channels, so every head has 32 channels as ours do
  cross_attention_dim  our text_dim = 384
  norm_num_groups      our number at level 0 (diffusers takes one value for every width and skip
                       concatenation; ours has groups of 16 channels, up to 32 groups);
                       norm_eps 1e-6 as ours
  resnet_time_scale_shift "scale_shift": the embedding scales and shifts the second GroupNorm, as ours
  class_embed_type     "projection" from projection_class_embeddings_input_dim = 384: the pooled text
                       vector is added to the time embedding (an MLP there, one Linear in ours)
  use_linear_projection True (Linear proj_in / proj_out, SD 2 style; ours has neither)
  time embedding       block_out_channels[0] * 4 = 128 = our 4 * channels
What cannot be matched by configuration: diffusers' feed-forward is GEGLU with 4x inner width (12 C^2
weights) where ours is a GELU MLP with 2x (4 C^2), and each diffusers transformer adds a GroupNorm and two
projections. That is most of its quarter more parameters and fifth more counted FLOPs (both printed).

`--preset small-p2q` measures the network `shapes-32` is trained with: a UNet on 2x2-folded pixels (16, 8
and 4 positions a side) with cross-attention at every level. Its diffusers counterpart gets the folded image
(12 channels at 16x16; folding and unfolding are in the timed step) and the same widths, blocks, attention
levels and heads. What ours computes and diffusers' model has no counterpart for: the two trainable text
layers over the tokens, the 2-D positions added at each attention level and to the cross-attention
queries. Those cost us time, so the ratio is conservative.

Run: .venv/bin/python benchmarks/train_throughput.py [--preset P] [--steps N] [--warmup N] [--batch B]
     [--threads T] [--precisions fp32,bf16] [--layouts channels_last,contiguous] [--profile]
Writes benchmarks/results/train_throughput.md and train_throughput.json (for another preset:
train_throughput_<preset>.md and .json). Needs diffusers
(`.venv/bin/pip install diffusers`); it fails at once, saying so, without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from unnoise.nn.layers import group_norm
from unnoise.nn.presets import PRESETS
from unnoise.nn.unet import UNet, UNetConfig, count_parameters
from unnoise.text.encoders import TextEmbedding
from unnoise.train.config import TrainConfig

DEFAULT_PRESET = "small"
TOKENS = 16  # text tokens per caption
MIN_TOKENS = 4  # the shortest caption in the batch, in tokens
MATMUL_SIZE = 2048
MATMUL_REPEATS = 10
GOAL = 2.0  # our best images/s over diffusers' best
MODELS = ("ours", "diffusers")
PRECISIONS = ("fp32", "bf16")
LAYOUTS = ("channels_last", "contiguous")
RESULTS = Path(__file__).resolve().parent / "results"
MISSING_DIFFUSERS = (
    "benchmarks/train_throughput.py compares against diffusers.UNet2DConditionModel, and diffusers is not"
    " installed: run `.venv/bin/pip install diffusers` (check that `.venv/bin/pip list | grep torch` still"
    " shows the CPU build afterwards)"
)


@dataclass(frozen=True)
class Row:
    """One configuration's measurement, from its own subprocess."""

    model: str
    precision: str  # "fp32" or "bf16" (autocast)
    layout: str  # "channels_last" or "contiguous"
    batch: int
    threads: int
    step_seconds: list[float]  # each timed step
    median_seconds: float
    images_per_s: float
    rss_before_mib: float  # resident set just before the first step
    peak_rss_mib: float  # ru_maxrss of the subprocess
    step_peak_mib: float  # peak_rss_mib - rss_before_mib
    final_loss: float


# --- the two models -------------------------------------------------------------------------------------


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        sys.exit(MISSING_DIFFUSERS)
    return diffusers


def diffusers_config(unet: UNetConfig) -> dict:
    """UNet2DConditionModel's arguments for the shape of our `unet` (the mapping: module docstring).

    A patch-folded UNet (`patch` p > 1) runs on p x p pixels folded into channels: diffusers' model gets the
    folded image (in_channels * p^2 channels at resolution / p), folded and unfolded around it by `forward`.
    """
    levels = range(len(unet.channel_mult))
    widths = tuple(unet.channels * m for m in unet.channel_mult)
    attends = [level in unet.attention_levels for level in levels]
    groups = group_norm(widths[0]).num_groups
    assert all(w % groups == 0 for w in widths), "norm_num_groups must divide every width"
    return {
        "sample_size": unet.resolution // unet.patch,
        "in_channels": unet.in_channels * unet.patch**2,
        "out_channels": unet.in_channels * unet.patch**2,
        "block_out_channels": widths,
        "layers_per_block": unet.blocks_per_level,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "only_cross_attention": tuple(
            level in unet.attention_levels and level not in unet.self_attention_levels for level in levels
        ),
        "attention_head_dim": tuple(max(1, w // unet.head_channels) for w in widths),  # heads, see above
        "cross_attention_dim": unet.text_dim,
        "norm_num_groups": groups,
        "norm_eps": 1e-6,
        "resnet_time_scale_shift": "scale_shift",
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": unet.text_dim,
        "use_linear_projection": True,
        "dropout": unet.dropout,
    }


def unet_preset(name: str) -> UNetConfig:
    config = PRESETS.get(name)
    if not isinstance(config, UNetConfig):
        unets = ", ".join(k for k, v in PRESETS.items() if isinstance(v, UNetConfig))
        raise argparse.ArgumentTypeError(f"{name!r} is not a UNet preset; choose from {unets}")
    return config


def build(model: str, preset: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "ours":
        return UNet(PRESETS[preset])
    diffusers = require_diffusers()
    return diffusers.UNet2DConditionModel(**diffusers_config(PRESETS[preset]))


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # (B, C, H, W) network input
    target: torch.Tensor  # (B, C, H, W)
    noise_level: torch.Tensor  # (B,) c_noise for ours, the timestep for diffusers
    text: TextEmbedding  # tokens (B, T, D), mask (B, T), pooled (B, D)


def make_batch(batch: int, layout: str, preset: str) -> Batch:
    config = PRESETS[preset]
    g = torch.Generator().manual_seed(1)
    shape = (batch, config.in_channels, config.resolution, config.resolution)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, generator=g).contiguous(memory_format=memory_format)
    target = torch.randn(shape, generator=g).contiguous(memory_format=memory_format)
    lengths = torch.randint(MIN_TOKENS, TOKENS + 1, (batch,), generator=g)
    mask = torch.arange(TOKENS)[None] < lengths[:, None]  # (B, T), True = a real token
    tokens = torch.randn(batch, TOKENS, config.text_dim, generator=g) * mask[:, :, None]  # (B, T, D)
    pooled = torch.randn(batch, config.text_dim, generator=g)  # (B, D)
    noise_level = torch.rand(batch, generator=g) * 999
    return Batch(x, target, noise_level, TextEmbedding(tokens, mask, pooled))


def forward(model: str, network: torch.nn.Module, batch: Batch, patch: int = 1) -> torch.Tensor:
    """The network's output (B, C, H, W), for either model, from the same batch.

    Ours folds `patch` x `patch` pixels itself; diffusers' model gets them folded, its output is unfolded.
    """
    if model == "ours":
        return network(batch.x, batch.noise_level, batch.text)
    text = batch.text
    folded = F.pixel_unshuffle(batch.x, patch) if patch > 1 else batch.x  # (B, C p^2, H / p, W / p)
    output = network(
        folded,
        batch.noise_level,
        encoder_hidden_states=text.tokens,
        class_labels=text.pooled,
        encoder_attention_mask=text.mask,
    ).sample
    return F.pixel_shuffle(output, patch) if patch > 1 else output


# --- one configuration, in its own process --------------------------------------------------------------


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM where there is /proc, else ru_maxrss.

    On Linux ru_maxrss survives fork + exec (the kernel keeps the larger of the old and new address
    space's high-water marks), so a subprocess would report the parent's peak whenever it is higher: here
    the parent's FLOP count, 2.8 GB, in every row. VmHWM belongs to the address space exec created.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10  # kB
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run_worker(args: argparse.Namespace) -> None:
    """Train `args.model` for warm-up + timed steps; print one JSON Row as the last line of stdout."""
    torch.set_num_threads(args.threads)
    memory_format = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    network = build(args.model, args.preset).to(memory_format=memory_format).train()
    patch = PRESETS[args.preset].patch
    defaults = TrainConfig()
    optimizer = torch.optim.AdamW(
        network.parameters(),
        lr=defaults.lr,
        betas=(0.9, 0.99),
        weight_decay=defaults.weight_decay,
        fused=True,
    )
    batch = make_batch(args.batch, args.layout, args.preset)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            output = forward(args.model, network, batch, patch)
        loss = F.mse_loss(output.float(), batch.target)
        loss.backward()
        optimizer.step()
        return loss.detach().item()

    rss_before = current_rss_mib()
    for _ in range(args.warmup):
        step()
    seconds, loss = [], float("nan")
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - start)
    peak = peak_rss_mib()
    if args.profile:
        profile_step(step, f"{args.model} {args.precision} {args.layout}")
    median = statistics.median(seconds)
    row = Row(
        model=args.model,
        precision=args.precision,
        layout=args.layout,
        batch=args.batch,
        threads=torch.get_num_threads(),
        step_seconds=seconds,
        median_seconds=median,
        images_per_s=args.batch / median,
        rss_before_mib=rss_before,
        peak_rss_mib=peak,
        step_peak_mib=peak - rss_before,
        final_loss=loss,
    )
    print(json.dumps(asdict(row)))


def profile_step(step, title: str) -> None:
    """The 15 operators with the most self CPU time in one step, to stderr (after the timing)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(f"\n### profile of one step: {title}\n{table}", file=sys.stderr, flush=True)


def measure(model: str, precision: str, layout: str, args: argparse.Namespace) -> Row | None:
    """One configuration in a fresh interpreter; None (and its error on stderr) if it failed."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"--model={model}",
        f"--precision={precision}",
        f"--layout={layout}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
        f"--preset={args.preset}",
        *(["--profile"] if args.profile else []),
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # stderr passes through
    if done.returncode != 0:
        print(f"{model} {precision} {layout}: failed with exit code {done.returncode}", file=sys.stderr)
        return None
    return Row(**json.loads(done.stdout.strip().splitlines()[-1]))


# --- the machine's rate and the models' FLOPs ------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype) -> float:
    """torch.mm of two MATMUL_SIZE square matrices: 2 n^3 FLOPs over the median of MATMUL_REPEATS runs."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=g).to(dtype) for _ in range(2))
    out = torch.empty(MATMUL_SIZE, MATMUL_SIZE, dtype=dtype)
    seconds = []
    for i in range(3 + MATMUL_REPEATS):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if i >= 3:  # the first three warm up
            seconds.append(time.perf_counter() - start)
    return 2 * MATMUL_SIZE**3 / statistics.median(seconds) / 1e9


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def training_flops(model: str, batch: int, preset: str) -> tuple[int, int]:
    """(parameters, FLOPs of one forward + backward at `batch`), in fp32, contiguous."""
    network = build(model, preset).train()
    inputs = make_batch(batch, "contiguous", preset)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        output = forward(model, network, inputs, PRESETS[preset].patch)
        F.mse_loss(output, inputs.target).backward()
    return count_parameters(network), counter.get_total_flops()


# --- reporting ------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def table(rows: list[Row], flops: dict[str, int], matmul: dict[str, float]) -> list[str]:
    lines = [
        "| model | precision | layout | images/s | step (ms) | GFLOP/s | % of mm | peak RSS (MiB)"
        " | RSS before (MiB) | step peak (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        achieved = flops[r.model] / r.median_seconds / 1e9
        lines.append(
            f"| {r.model} | {r.precision} | {r.layout} | {r.images_per_s:.1f} | {1e3 * r.median_seconds:.0f}"
            f" | {achieved:.0f} | {100 * achieved / matmul[r.precision]:.1f}% | {r.peak_rss_mib:.0f}"
            f" | {r.rss_before_mib:.0f} | {r.step_peak_mib:.0f} |"
        )
    return lines


def ratio_table(rows: list[Row]) -> list[str]:
    """ours / diffusers images/s for each precision and layout measured for both."""
    by_key = {(r.model, r.precision, r.layout): r for r in rows}
    lines = ["| precision | layout | ours / diffusers |", "|---|---|---:|"]
    for precision in PRECISIONS:
        for layout in LAYOUTS:
            ours = by_key.get(("ours", precision, layout))
            theirs = by_key.get(("diffusers", precision, layout))
            if ours and theirs:
                lines.append(f"| {precision} | {layout} | {ours.images_per_s / theirs.images_per_s:.2f} |")
    return lines


def summarize(rows: list[Row]) -> dict:
    ours, theirs = (
        max((r for r in rows if r.model == model), key=lambda r: r.images_per_s, default=None)
        for model in MODELS
    )
    if ours is None or theirs is None:
        return {"pass": False, "line": "summary: a model has no successful configuration: FAIL"}
    ratio = ours.images_per_s / theirs.images_per_s
    passed = ratio >= GOAL
    line = (
        f"best: ours {ours.images_per_s:.1f} images/s ({ours.precision}, {ours.layout}) vs diffusers"
        f" {theirs.images_per_s:.1f} images/s ({theirs.precision}, {theirs.layout}): ratio {ratio:.2f},"
        f" goal >= {GOAL:g}: {'PASS' if passed else 'FAIL'}"
    )
    return {"ours": asdict(ours), "diffusers": asdict(theirs), "ratio": ratio, "pass": passed, "line": line}


def write_results(markdown: str, record: dict, preset: str) -> None:
    """train_throughput.md / .json for the default preset, train_throughput_<preset>.md / .json for others."""
    stem = "train_throughput" if preset == DEFAULT_PRESET else f"train_throughput_{preset}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(markdown)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS / stem}.md and .json")


def choices(text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    picked = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in picked if item not in allowed]
    if unknown or not picked:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
    return picked


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        type=lambda name: unet_preset(name) and name,
        help=f"our UNet preset, and the diffusers model of its shape (default {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--precisions", type=lambda s: choices(s, PRECISIONS), default=PRECISIONS, help="fp32,bf16"
    )
    parser.add_argument(
        "--layouts", type=lambda s: choices(s, LAYOUTS), default=LAYOUTS, help="channels_last,contiguous"
    )
    parser.add_argument("--profile", action="store_true", help="print each configuration's top operators")
    # one configuration in this process (what the main process runs in its subprocesses)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        parser.error("--steps, --batch and --threads must be at least 1, --warmup at least 0")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:  # imports diffusers only to build its model, so that ours is measured without it
        run_worker(args)
        return
    diffusers = require_diffusers()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    matmul = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    counted = {model: training_flops(model, args.batch, args.preset) for model in MODELS}
    params = {model: p for model, (p, _) in counted.items()}
    flops = {model: f for model, (_, f) in counted.items()}
    print(
        f"parameters: ours {params['ours']:,}, diffusers {params['diffusers']:,};"
        f" GFLOP per step (forward + backward, batch {args.batch}): ours {flops['ours'] / 1e9:.1f},"
        f" diffusers {flops['diffusers'] / 1e9:.1f}; torch.mm {MATMUL_SIZE}: fp32 {matmul['fp32']:.0f},"
        f" bf16 {matmul['bf16']:.0f} GFLOP/s",
        flush=True,
    )

    rows = []
    for precision in args.precisions:
        for layout in args.layouts:
            for model in MODELS:
                row = measure(model, precision, layout, args)
                if row is not None:
                    rows.append(row)
                    print(f"{model} {precision} {layout}: {row.images_per_s:.1f} images/s", flush=True)
    summary = summarize(rows)
    wall = time.perf_counter() - start

    config = PRESETS[args.preset]
    header = [
        "# Training throughput: our UNet vs diffusers' UNet2DConditionModel",
        "",
        f"`{args.preset}` preset at {config.resolution}x{config.resolution}, batch {args.batch},"
        f" {TOKENS} text tokens of dim {config.text_dim}; one step = forward + MSE + backward + AdamW;"
        f" median of {args.steps} steps after {args.warmup} warm-up, each configuration in its own"
        f" process. {cpu_name()}, {args.threads} threads, torch {torch.__version__},"
        f" diffusers {diffusers.__version__}.",
        "",
        f"Parameters: ours {params['ours']:,}, diffusers {params['diffusers']:,}"
        f" ({params['diffusers'] / params['ours']:.2f}x). GFLOP per step (forward + backward, counted):"
        f" ours {flops['ours'] / 1e9:.1f}, diffusers {flops['diffusers'] / 1e9:.1f}"
        f" ({flops['diffusers'] / flops['ours']:.2f}x). torch.mm {MATMUL_SIZE}x{MATMUL_SIZE}:"
        f" fp32 {matmul['fp32']:.0f} GFLOP/s, bf16 {matmul['bf16']:.0f} GFLOP/s.",
        "",
        "GFLOP/s: counted FLOPs of the model / median step time; % of mm: of torch.mm's rate in the same"
        " precision. Step peak: peak RSS minus the RSS before the first step.",
        "",
    ]
    footer = ["", "Ours / diffusers, images/s:", "", *ratio_table(rows), "", "## Summary", ""]
    footer += [summary["line"], "", f"wall time: {wall:.1f} s", ""]
    markdown = "\n".join(header + table(rows, flops, matmul) + footer)
    print(markdown)
    record = {
        "settings": {
            "preset": args.preset,
            "resolution": config.resolution,
            "batch": args.batch,
            "tokens": TOKENS,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": args.threads,
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "ours_config": config.to_dict(),
        "diffusers_config": diffusers_config(config),
        "parameters": params,
        "flops_per_step": flops,
        "matmul_gflops": matmul,
        "rows": [asdict(row) for row in rows],
        "summary": summary,
        "wall_seconds": wall,
    }
    write_results(markdown, record, args.preset)


if __name__ == "__main__":
    main()
