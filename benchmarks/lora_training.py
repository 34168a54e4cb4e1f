"""LoRA training against full fine-tuning on a 20-image folder (issue 30): how far each moves a model's
samples towards the folder, in how many minutes, with how large a file.

The folder: 20 emoji of `../shared/datasets/emoji-noto-64` drawn with a fixed seed, none whose caption
names a colour, shape, size, place or number (so the base, `shapes-32`, has never seen the like). Each
run starts from `shapes-32`:

- **LoRA**: `unnoise train --init-from shapes-32 --lora-rank 8 --data FOLDER` (adapters on every attention
  projection, the model frozen), `--steps` steps;
- **full fine-tune**: `--init-from shapes-32` alone, the same steps (every weight trains).

For every folder caption and 2 seeds (40 images, 20 DPM++ 2M steps, the model's guidance), the distance
of a sample to the folder: root-mean-square pixel distance ([0, 1] scale, at the model's 32x32) to its own
caption's image, and to the nearest folder image. The base model gives the starting point. The LoRA at
scale 0 is checked to give the base's images bit for bit.

Run: .venv/bin/python benchmarks/lora_training.py [--steps 1000] [--out /work/runs/lora-bench]
Writes benchmarks/results/lora_training.md and .json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import unnoise

RESULTS = Path(__file__).parent / "results"
DATASET = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "emoji-noto-64"
SHAPE_WORDS = re.compile(
    r"\b(circle|square|triangle|red|blue|green|yellow|orange|purple|white|black|left|right|top|bottom"
    r"|large|small|two|three|four)\b"
)


def make_folder(folder: Path, count: int = 20) -> list[dict]:
    rows = [json.loads(line) for line in (DATASET / "metadata.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(rows)
    picked = [r for r in rows if not SHAPE_WORDS.search(r["text"])][:count]
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    for row in picked:
        shutil.copy(DATASET / row["file_name"], folder / row["file_name"])
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
    return picked


def train(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unnoise", "train", *args], check=True, capture_output=True)
    return (time.perf_counter() - started) / 60


def distances(images: list[Image.Image], own: list[np.ndarray], folder: np.ndarray) -> tuple[float, float]:
    made = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])  # (N, 32, 32, 3)
    to_own = np.sqrt(((made - np.stack(own)) ** 2).mean(axis=(1, 2, 3))).mean()
    to_all = np.sqrt(((made[:, None] - folder[None]) ** 2).mean(axis=(2, 3, 4))).min(axis=1).mean()
    return float(to_own), float(to_all)


def samples(pipe, captions: list[str]) -> list[Image.Image]:
    return [im for caption in captions for im in pipe.generate(caption, seed=7, num_images=2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="/work/runs/lora-bench")
    args = parser.parse_args()
    out = Path(args.out)
    rows = make_folder(out / "folder")
    common = ["--init-from", "shapes-32", "--data", str(out / "folder"), "--steps", str(args.steps),
              "--batch-size", "16", "--warmup-steps", "20", "--sample-every", "0", "--checkpoint-every",
              str(args.steps)]  # fmt: skip
    minutes = {
        "LoRA": train([*common, "--lora-rank", str(args.rank), "--lr", "1e-3", "--out", str(out / "lora")]),
        "full fine-tune": train([*common, "--lr", "5e-5", "--out", str(out / "full")]),
    }
    captions = [r["text"] for r in rows]
    size = 32

    def pixels(row: dict) -> np.ndarray:  # (32, 32, 3) in [0, 1], as the model's size
        image = (
            Image.open(out / "folder" / row["file_name"]).convert("RGB").resize((size, size), Image.BICUBIC)
        )
        return np.asarray(image, dtype=np.float32) / 255

    own = [pixels(r) for r in rows for _ in range(2)]
    folder = np.stack(own[::2])
    base = unnoise.load("shapes-32", device="cpu")
    base_images = samples(base, captions)
    lora = out / "lora" / "model" / "lora.safetensors"
    base.add_lora(lora, 0.0)
    identical = [im.tobytes() for im in samples(base, captions[:3])] == [
        im.tobytes() for im in base_images[:6]
    ]
    base.remove_loras()
    base.add_lora(lora, 1.0)
    results = {"base": (*distances(base_images, own, folder), 0.0, None)}
    results["LoRA"] = (*distances(samples(base, captions), own, folder), minutes["LoRA"], lora.stat().st_size)
    full = unnoise.load(out / "full" / "model", device="cpu")
    weights = next((out / "full" / "model").glob("model*.safetensors"))
    results["full fine-tune"] = (*distances(samples(full, captions), own, folder), minutes["full fine-tune"],
                                 weights.stat().st_size)  # fmt: skip
    model_bytes = next(
        Path(unnoise.__file__).parent.joinpath("models", "shapes-32").glob("model*.safetensors")
    )
    lines = [
        f"# LoRA (rank {args.rank}) against full fine-tuning of shapes-32 on 20 emoji,"
        f" {args.steps} steps of 16",
        "",
        "| model | RMS distance to its caption's image | to the nearest folder image | training minutes |"
        " file bytes |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (to_own, to_all, mins, size_bytes) in results.items():
        said = "-" if size_bytes is None else f"{size_bytes:,}"
        lines.append(f"| {name} | {to_own:.4f} | {to_all:.4f} | {mins:.1f} | {said} |")
    lines += [
        "",
        f"LoRA file: {lora.stat().st_size:,} bytes ="
        f" {lora.stat().st_size / model_bytes.stat().st_size:.1%} of"
        f" shapes-32's weights file ({model_bytes.stat().st_size:,} bytes, 16-bit); scale 0 gives the base"
        f" model's images bit for bit: {identical}",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_training.md").write_text(text)
    (RESULTS / "lora_training.json").write_text(
        json.dumps({"results": results, "identical_at_0": identical}, indent=1)
    )


if __name__ == "__main__":
    main()
