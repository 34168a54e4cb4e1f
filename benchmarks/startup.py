"""Start-up cost of generation: import + load + one 20-step image, ours against diffusers, on a CPU.

What a new user waits for between pressing Enter and seeing an image. Each measurement runs in a fresh
Python process (so nothing is warm but the operating system's file cache), and each phase is timed
inside it:

    import   `import unnoise` and what `unnoise.load` imports      | `import diffusers, transformers`
    load     `unnoise.load(MODEL)`: network + MiniLM (+ autoencoder) | UNet2DConditionModel.from_pretrained
                                                                   |   + MiniLM with transformers (+ VAE)
    image 1  20 steps of DPM-Solver++(2M), guidance 3, one image,  | DPMSolverMultistepScheduler, same
             decoded to pixels for a latent model                  |   (AutoencoderKL.decode)
    image 2  the same again, now warm                              |

The peer is the same job built from diffusers' parts: a UNet2DConditionModel of the same shape as our
model's network (`diffusers_config` from benchmarks/train_throughput.py, random weights saved once with
save_pretrained), for a latent model (`--model emoji-64`) an AutoencoderKL of our autoencoder's shape, the
same MiniLM text encoder loaded with transformers, and diffusers' DPM-Solver++ 2M scheduler (its default
algorithm and order) with classifier-free guidance as diffusers' pipelines do it (one batch of
unconditional and conditional inputs). `process` is the wall time of the whole process as seen by its
parent, interpreter start and exit included. `unnoise generate` is the CLI end to end.

Run: .venv/bin/python benchmarks/startup.py [--model emoji-64] [--prompt "red apple"] [--repeats 5]
     (diffusers comes with the dev install, or `pip install -e ".[diffusers]"`)
Writes benchmarks/results/startup.md and .json (startup_<model>.md and .json for another model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "a red circle above a blue square"
STEPS, GUIDANCE = 20, 3.0
PHASES = ("import", "load", "image 1", "image 2", "process")


# --- workers: each runs in its own process and prints one JSON line of phase times ----------------------


def worker_ours(model: str, prompt: str) -> dict[str, float]:
    t0 = time.perf_counter()
    import unnoise
    import unnoise.pipeline  # what load() brings in: torch, the UNet, the samplers

    t1 = time.perf_counter()
    pipe = unnoise.load(model)
    t2 = time.perf_counter()
    pipe.generate(prompt, seed=1, steps=STEPS, guidance=GUIDANCE)
    t3 = time.perf_counter()
    pipe.generate(prompt, seed=2, steps=STEPS, guidance=GUIDANCE)
    t4 = time.perf_counter()
    return {"import": t1 - t0, "load": t2 - t1, "image 1": t3 - t2, "image 2": t4 - t3}


def worker_diffusers(unet_folder: str, prompt: str) -> dict[str, float]:
    t0 = time.perf_counter()
    import diffusers
    import torch
    import transformers

    t1 = time.perf_counter()
    from unnoise.text.encoders import packaged_minilm_path

    minilm = packaged_minilm_path()
    unet = diffusers.UNet2DConditionModel.from_pretrained(unet_folder).eval()
    vae_folder = Path(unet_folder) / "vae"
    vae = diffusers.AutoencoderKL.from_pretrained(vae_folder).eval() if vae_folder.is_dir() else None
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm)
    encoder = transformers.AutoModel.from_pretrained(minilm).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler()
    t2 = time.perf_counter()

    @torch.no_grad()
    def image(seed: int) -> torch.Tensor:
        tokens = tokenizer(["", prompt], padding=True, return_tensors="pt")
        states = encoder(**tokens).last_hidden_state  # (2, T, 384): unconditional, conditional
        mask = tokens["attention_mask"].bool()
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (2, 384)
        size = unet.config.sample_size
        channels = unet.config.in_channels
        x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed))
        scheduler.set_timesteps(STEPS)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            both = unet(
                torch.cat([x, x]), t, encoder_hidden_states=states, class_labels=pooled,
                encoder_attention_mask=mask,
            ).sample  # fmt: skip
            uncond, cond = both.chunk(2)
            x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
        return x if vae is None else vae.decode(x / vae.config.scaling_factor).sample  # (1, 3, R, R)

    image(1)
    t3 = time.perf_counter()
    image(2)
    t4 = time.perf_counter()
    return {"import": t1 - t0, "load": t2 - t1, "image 1": t3 - t2, "image 2": t4 - t3}


def save_diffusers_parts(folder: Path, model: str) -> None:
    """A UNet2DConditionModel of our model's UNet shape and, for a latent model, an AutoencoderKL (vae/) of
    its autoencoder's shape (same widths, blocks and latent channels; no attention in its middle block, as
    ours has none); random weights, safetensors."""
    import diffusers
    import torch

    sys.path.insert(0, str(HERE))
    from train_throughput import diffusers_config

    from unnoise.nn.presets import network_config_from_dict
    from unnoise.release import CODEC_FOLDER, read_release_config, resolve_model

    release = resolve_model(model)
    config = read_release_config(release)
    torch.manual_seed(0)
    unet = network_config_from_dict(config["network"])
    diffusers.UNet2DConditionModel(**diffusers_config(unet)).save_pretrained(folder)
    if "codec" in config:
        ae = read_release_config(release / CODEC_FOLDER)["network"]
        widths = tuple(ae["channels"] * m for m in ae["channel_mult"])
        diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=ae["latent_channels"], block_out_channels=widths,
            down_block_types=("DownEncoderBlock2D",) * len(widths),
            up_block_types=("UpDecoderBlock2D",) * len(widths),
            layers_per_block=ae["blocks_per_level"], norm_num_groups=min(32, widths[0] // 2),
            sample_size=ae["resolution"], mid_block_add_attention=False,
        ).save_pretrained(folder / "vae")  # fmt: skip


# --- the parent: fresh processes, medians, the table ----------------------------------------------------


def run_process(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark process failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
    return wall, done.stdout


def measure(kind: str, target: str, repeats: int, prompt: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for _ in range(repeats):
        argv = [sys.executable, __file__, "--worker", kind, "--target", target, "--prompt", prompt]
        wall, out = run_process(argv)
        phases = json.loads(out.strip().splitlines()[-1])
        for phase, seconds in {**phases, "process": wall}.items():
            times[phase].append(seconds)
    return times


def measure_cli(model: str, repeats: int, prompt: str) -> list[float]:
    unnoise = Path(sys.executable).with_name("unnoise")
    with tempfile.TemporaryDirectory() as out:
        argv = [str(unnoise), "generate", prompt, "--seed", "1", "--model", model, "--out", out]
        return [run_process(argv)[0] for _ in range(repeats)]


def table(ours: dict[str, list[float]], theirs: dict[str, list[float]], cli: list[float]) -> list[str]:
    lines = ["| phase | unnoise (s) | diffusers parts (s) | diffusers / unnoise |", "|---|---:|---:|---:|"]
    for phase in PHASES:
        a, b = statistics.median(ours[phase]), statistics.median(theirs[phase])
        lines.append(f"| {phase} | {a:.3f} | {b:.3f} | {b / a:.2f}x |")
    lines.append(f"| `unnoise generate` CLI, end to end | {statistics.median(cli):.3f} | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per measurement (median)")
    parser.add_argument("--model", default="shapes-32", help="our model: a shipped name or a folder")
    parser.add_argument("--prompt", default=PROMPT, help=f"the prompt (default {PROMPT!r})")
    parser.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = worker_ours if args.worker == "ours" else worker_diffusers
        print(json.dumps(work(args.target, args.prompt)))
        return
    try:
        import diffusers
    except ImportError:
        sys.exit('benchmarks/startup.py needs diffusers: `.venv/bin/pip install -e ".[diffusers]"`')

    with tempfile.TemporaryDirectory() as folder:
        save_diffusers_parts(Path(folder), args.model)
        theirs = measure("diffusers", folder, args.repeats, args.prompt)
    ours = measure("ours", args.model, args.repeats, args.prompt)
    cli = measure_cli(args.model, args.repeats, args.prompt)

    import torch

    header = [
        "# Start-up: import + load + one 20-step image",
        "",
        f"Median of {args.repeats} fresh processes; one image (decoded, for a latent model), {STEPS} steps"
        " of DPM-Solver++(2M),"
        f" guidance {GUIDANCE:g}; model `{args.model}` against diffusers {diffusers.__version__} parts"
        f" of the same shape (see the script's docstring). torch {torch.__version__},"
        f" {os.cpu_count()} CPUs. `.venv/bin/python benchmarks/startup.py --repeats {args.repeats}"
        f"{'' if args.model == 'shapes-32' else f' --model {args.model}'}"
        f"{'' if args.prompt == PROMPT else f' --prompt {args.prompt!r}'}`",
        "",
    ]
    markdown = "\n".join([*header, *table(ours, theirs, cli), ""])
    print(markdown)
    RESULTS.mkdir(exist_ok=True)
    name = "startup" if args.model == "shapes-32" else f"startup_{Path(args.model).name}"
    (RESULTS / f"{name}.md").write_text(markdown)
    record = {"repeats": args.repeats, "model": args.model, "ours": ours, "diffusers": theirs, "cli": cli}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
