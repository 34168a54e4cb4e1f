"""Seconds per step of a Stable Diffusion 1.5-shaped model at 512x512 with guidance: unnoise against
diffusers' own StableDiffusionPipeline, side by side on this CPU (issue 32's speed floor).

The model is SD 1.5's published shape (UNet 860M: blocks 320/640/1280/1280, cross-attention 768; VAE
128/256/512/512; CLIP ViT-L/14 text encoder, 12 layers of 768) with random weights, saved once as a
diffusers folder (safetensors) outside the checkout; no download. Both sides load that folder in the same
precision (bfloat16 for the UNet and text encoder where the CPU has AVX-512 bf16 or AMX, else float32; the
VAE in float32), and run the same sampler: DPM-Solver++ 2M (diffusers' DPMSolverMultistepScheduler
from the model's config; unnoise's `dpmpp_2m` with `convention="diffusers"`), guidance 7.5, one image,
latents out (the VAE decode is the same module on both sides and is not timed). Each side runs in its own
process (peak memory is that process's maximum resident set, which both reach while diffusers' loader reads
the weights), a warm-up generation of 1 step first, then `--steps` steps; each side runs twice in the order
diffusers, unnoise, unnoise, diffusers; the step time is the median interval between step callbacks. Load
time: the median of the two; unnoise's first load of a model also hashes its UNet weights (A1111's model
hash, then cached).

Run: .venv/bin/python benchmarks/sd_speed.py [--steps 4] [--folder /work/runs/sd15-random]
Writes benchmarks/results/sd_speed.md and .json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PROMPT, GUIDANCE, SEED = "a photograph of an astronaut riding a horse", 7.5, 1


def cpu_has_bf16() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_folder(folder: Path, dtype: torch.dtype) -> None:
    """SD 1.5's shapes with random weights, as a diffusers folder."""
    import diffusers
    import transformers

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.sd_fixtures import tiny_tokenizer

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        )
    )  # fmt: skip
    scheduler = diffusers.PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        steps_offset=1, set_alpha_to_one=False,
    )  # fmt: skip
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text.to(dtype), tokenizer=tiny_tokenizer(), unet=unet.to(dtype),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder, safe_serialization=True)


def run_diffusers(folder: Path, dtype: torch.dtype, steps: int) -> dict:
    import diffusers

    started = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    pipe.vae.to(torch.float32)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter() - started
    stamps = []

    def on_step(pipeline, i, t, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    def generate(n):
        stamps.clear()
        stamps.append(time.perf_counter())
        pipe(PROMPT, num_inference_steps=n, guidance_scale=GUIDANCE, height=512, width=512,
             output_type="latent", generator=torch.Generator().manual_seed(SEED),
             callback_on_step_end=on_step)  # fmt: skip

    generate(1)
    generate(steps)
    return {"load_s": loaded, "steps": intervals(stamps)}


def run_unnoise(folder: Path, dtype: torch.dtype, steps: int) -> dict:
    import unnoise

    started = time.perf_counter()
    precision = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    pipe = unnoise.load(folder, device="cpu", convention="diffusers", precision=precision)
    loaded = time.perf_counter() - started
    stamps = []

    def generate(n):
        stamps.clear()
        stamps.append(time.perf_counter())
        pipe.generate(PROMPT, sampler="dpmpp_2m", steps=n, guidance=GUIDANCE, seed=SEED, output_type="latent",
                      callback=lambda step: stamps.append(time.perf_counter()))  # fmt: skip

    generate(1)
    generate(steps)
    # unnoise's callback comes after each step's denoiser call, diffusers' after each scheduler step: both
    # after the step's one UNet evaluation (batch of 2: unconditional and conditional)
    return {"load_s": loaded, "steps": intervals(stamps)}


def intervals(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def side(args) -> None:
    torch.set_num_threads(torch.get_num_threads())
    dtype = torch.bfloat16 if args.precision == "bfloat16" else torch.float32
    run = run_diffusers if args.side == "diffusers" else run_unnoise
    result = run(Path(args.folder), dtype, args.steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def pooled(runs: list[dict]) -> dict:
    """The runs of one side together: every step, the median load time, the largest peak."""
    return {
        "steps": [s for run in runs for s in run["steps"]],
        "load_s": statistics.median(run["load_s"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--rounds", type=int, choices=(1, 2), default=2, help="2: diffusers, ours, ours, diffusers"
    )
    parser.add_argument("--folder", default="/work/runs/sd15-random")
    parser.add_argument("--precision", choices=("bfloat16", "float32"), default=None)
    parser.add_argument("--side", choices=("diffusers", "unnoise"), default=None)
    args = parser.parse_args()
    args.precision = args.precision or ("bfloat16" if cpu_has_bf16() else "float32")
    if args.side:
        return side(args)
    folder = Path(args.folder) / args.precision
    if not (folder / "model_index.json").exists():
        print(f"building SD 1.5-shaped random weights in {folder} ...", file=sys.stderr)
        build_folder(folder, torch.bfloat16 if args.precision == "bfloat16" else torch.float32)
    results = {"diffusers": [], "unnoise": []}
    for name in ("diffusers", "unnoise", "unnoise", "diffusers")[
        : 2 * args.rounds
    ]:  # ABBA: no order favoured
        done = subprocess.run(
            [sys.executable, __file__, "--side", name, "--folder", str(folder), "--steps", str(args.steps),
             "--precision", args.precision],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    d, u = (pooled(results[name]) for name in ("diffusers", "unnoise"))
    step_d, step_u = statistics.median(d["steps"]), statistics.median(u["steps"])
    lines = [
        f"# SD 1.5-shaped model (random weights), 512x512, guidance {GUIDANCE}, DPM++ 2M, {args.steps} steps,"
        f" {args.precision} UNet and text encoder, {torch.get_num_threads()} threads",
        "",
        "| | seconds per step (median) | steps measured | load s | peak memory MB |",
        "|---|---:|---|---:|---:|",
        f"| diffusers StableDiffusionPipeline | {step_d:.2f} | {', '.join(f'{s:.2f}' for s in d['steps'])} |"
        f" {d['load_s']:.1f} | {d['peak_rss_mb']:.0f} |",
        f"| unnoise | {step_u:.2f} | {', '.join(f'{s:.2f}' for s in u['steps'])} | {u['load_s']:.1f} |"
        f" {u['peak_rss_mb']:.0f} |",
        "",
        f"unnoise / diffusers seconds per step: **{step_u / step_d:.3f}**",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sd_speed.md").write_text(text)
    (RESULTS / "sd_speed.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
