"""What each autoencoder loss buys: L1 alone, L1 + the gradient (edge) loss, L1 + gradient + frequency.

Each variant is `unnoise train-autoencoder` on the same folder, preset, steps, seed and held-out concepts,
differing only in `--gradient-weight` and `--frequency-weight`. Each release is then judged on every
held-out image as `unnoise eval folder` judges a latent model's autoencoder: PSNR, SSIM, the mean L1
error of the images' finite differences (edges: lower is sharper), and the Fréchet distance of the
reconstructions to the originals on the folder judge's features (the judge cached by `unnoise eval folder`
for this folder, or trained once here). Runs keep their state under `--runs` and resume.

Run: .venv/bin/python benchmarks/autoencoder_losses.py --data ../shared/datasets/emoji-noto-64 \
         --runs /tmp/ae-losses [--steps 500]
Writes benchmarks/results/autoencoder_losses.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
UNNOISE = str(Path(sys.executable).with_name("unnoise"))
VARIANTS = {  # name: (gradient weight, frequency weight)
    "L1": (0.0, 0.0),
    "L1 + gradient (the default)": (1.0, 0.0),
    "L1 + gradient + frequency": (1.0, 1.0),
}


def train(name: str, weights: tuple[float, float], args: argparse.Namespace) -> Path:
    out = Path(args.runs) / name.split(" (")[0].replace(" + ", "-").replace(" ", "")
    command = [UNNOISE, "train-autoencoder", "--out", str(out)]
    if (out / "config.json").exists():
        command += ["--resume"]
    else:
        command += [
            "--data", args.data, "--preset", "f4c4", "--held-out", "0.1", "--flip", "--batch-size", "32",
            "--lr", "4e-4", "--steps", str(args.steps), "--gradient-weight", str(weights[0]),
            "--frequency-weight", str(weights[1]),
        ]  # fmt: skip
    with open(out.with_suffix(".log"), "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out / "model"


@torch.no_grad()
def judge_release(release: Path, judge, split) -> dict:
    from unnoise.codec import load_codec
    from unnoise.data.folder import to_unit_range
    from unnoise.eval.folder_eval import codec_report
    from unnoise.train.autoencoder import gradient_loss

    codec = load_codec(release)
    report = codec_report(judge, codec, split.held_pixels)
    x = to_unit_range(split.held_pixels)
    y = torch.cat([codec.decode(codec.encode(c)) for c in x.split(128)])
    return report | {"edge_l1": round(float(gradient_loss(y, x)), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs", required=True, help="where the runs keep their state (resumable)")
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    releases = {name: train(name, weights, args) for name, weights in VARIANTS.items()}

    from unnoise.eval.folder_eval import chunked, judge_for, split_folder
    from unnoise.text.encoders import load_text_encoder

    split = split_folder(args.data, 64, held_out=0.1, seed=0)
    minilm = load_text_encoder("minilm", max_tokens=32)

    def encode_text(texts: list[str]) -> torch.Tensor:
        return torch.cat([minilm.encode(list(c)).pooled.float().cpu() for c in chunked(texts, 256)])

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unnoise" / "judges"
    judge = judge_for(split, encode_text, cache, 1500, 0)
    rows = {name: judge_release(release, judge, split) for name, release in releases.items()}
    lines = [
        f"# Autoencoder losses: f4c4, {args.steps} steps of 32 images each"
        f" ({platform.processor() or platform.machine()})",
        "",
        f"Held out: {len(split.held_captions)} images of {Path(args.data).name}. FD on the folder judge's"
        " features; the originals blurred (halved, enlarged) give"
        f" {next(iter(rows.values()))['fd_blurred_control']:.3f} as a scale.",
        "",
        "| losses | PSNR (dB) | SSIM | edge L1 | FD |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {n} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['edge_l1']:.4f} | {r['fd']:.4f} |"
        for n, r in rows.items()
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "autoencoder_losses.md").write_text(text)
    (RESULTS / "autoencoder_losses.json").write_text(json.dumps({"steps": args.steps, **rows}, indent=1))


if __name__ == "__main__":
    main()
