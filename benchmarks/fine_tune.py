"""Fine-tuning shapes-32 on a small folder: what it learns and what it forgets (issue 30).

The folder: 20 emoji of `../shared/datasets/emoji-noto-64` (fixed seed) whose captions name no shape,
colour, size, place or number, the things shapes-32 was taught. Each run is `unnoise train --init-from
shapes-32 --data FOLDER`, 300 steps of 16 images, warm-up 20:

- full fine-tune at lr 5e-5, and at lr 1e-5;
- full fine-tune at lr 5e-5 with `--regularization shapes` (half of every batch from the built-in shapes,
  the data shapes-32 learned from);
- LoRA of rank 8 at lr 1e-3 (the model frozen), its file size against the model's, and scale 0 checked
  to give the base model's images bit for bit.

Judged by ShapesEval (all 96 prompts, 4 images each: does it still draw what it knew?), by its denoising
loss on the folder's images with their captions at 6 fixed noise levels and fixed noise (the validation
loss's levels: has it learned the folder?), and by how near its samples for the folder's captions (2 seeds
each) come to the folder: root-mean-square pixel distance at 32x32 to each caption's own image and to the
nearest folder image (a crude measure: a white page with a small shape is nearer an emoji in pixels than
an emoji-like drawing that differs in detail).

Run: .venv/bin/python benchmarks/fine_tune.py [--out /work/runs/fine-tune] [--reuse]
(--reuse keeps finished runs and reports in --out). Writes benchmarks/results/fine_tune.md and .json.
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


def distances(images: list[Image.Image], own: list[np.ndarray], folder: np.ndarray) -> tuple[float, float]:
    made = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])  # (N, 32, 32, 3)
    to_own = np.sqrt(((made - np.stack(own)) ** 2).mean(axis=(1, 2, 3))).mean()
    to_all = np.sqrt(((made[:, None] - folder[None]) ** 2).mean(axis=(2, 3, 4))).min(axis=1).mean()
    return float(to_own), float(to_all)


def samples(pipe, captions: list[str]) -> list[Image.Image]:
    return [im for caption in captions for im in pipe.generate(caption, seed=7, num_images=2)]


RUNS = {
    "full, lr 5e-5": ["--lr", "5e-5"],
    "full, lr 1e-5": ["--lr", "1e-5"],
    "full, lr 5e-5, --regularization shapes": ["--lr", "5e-5", "--regularization", "shapes"],
    "LoRA rank 8, lr 1e-3": ["--lr", "1e-3", "--lora-rank", "8"],
}


def run(out: Path, folder: Path, extra: list[str], reuse: bool) -> float:
    if reuse and (out / "model" / "config.json").exists():  # its minutes from its log.csv
        rows = (out / "log.csv").read_text().splitlines()[1:]
        steps, times = [int(r.split(",")[0]) for r in rows], [float(r.split(",")[-1]) for r in rows]
        return (times[-1] - times[0]) / (steps[-1] - steps[0]) * steps[-1] / 60
    started = time.perf_counter()
    command = [sys.executable, "-m", "unnoise", "train", "--init-from", "shapes-32", "--data", str(folder),
               "--steps", "300", "--batch-size", "16", "--warmup-steps", "20", "--sample-every", "0",
               "--checkpoint-every", "300", "--out", str(out), *extra]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return (time.perf_counter() - started) / 60


def folder_loss(pipe, captions: list[str], pixels: list[np.ndarray]) -> float:
    """The model's denoising loss on the folder's own images and captions, at the 6 fixed noise levels of
    the validation loss (train/watch.py) with fixed noise: how well it has learned the folder."""
    import torch

    from unnoise.train.watch import validation_levels

    x0 = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) * 2 - 1  # (N, 3, 32, 32) in [-1, 1]
    cond = pipe.encode(captions)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for sigma in validation_levels(pipe.denoiser.formulation):
            noise = torch.randn(x0.shape, generator=generator)
            losses.append(float(pipe.denoiser.loss(x0, torch.full((len(x0),), sigma), noise, cond).mean()))
    return sum(losses) / len(losses)


def shapes_eval(pipe, report: Path, reuse: bool) -> dict:
    """ShapesEval's categories for a loaded pipeline (a LoRA applied or not), as `unnoise eval shapes`."""
    from unnoise.eval.shapes_eval import evaluate

    if not (reuse and report.exists()):

        def generate(prompt: str, seed: int, n: int):
            return pipe.generate(prompt, seed=seed, num_images=n)

        report.write_text(json.dumps(evaluate(generate, samples_per_prompt=4).to_dict()))
    return json.loads(report.read_text())["categories"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/work/runs/fine-tune")
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    folder = out / "folder"
    if not (args.reuse and (folder / "metadata.jsonl").exists()):
        make_folder(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    captions = [r["text"] for r in rows]

    def pixels(row: dict) -> np.ndarray:
        image = Image.open(folder / row["file_name"]).convert("RGB").resize((32, 32), Image.BICUBIC)
        return np.asarray(image, dtype=np.float32) / 255

    own = [pixels(r) for r in rows for _ in range(2)]
    everyone = np.stack(own[::2])
    base = unnoise.load("shapes-32", device="cpu")
    table = {"shapes-32 (base)": {
        "shapes": shapes_eval(base, out / "base-shapes.json", args.reuse),
        "distances": distances(samples(base, captions), own, everyone), "minutes": 0.0,
        "folder_loss": folder_loss(base, captions, own[::2]),
    }}  # fmt: skip
    lora_note = ""
    for i, (name, extra) in enumerate(RUNS.items()):
        run_dir = out / f"run-{i}"
        minutes = run(run_dir, folder, extra, args.reuse)
        if "--lora-rank" in extra:
            pipe = unnoise.load("shapes-32", device="cpu")
            lora = run_dir / "model" / "lora.safetensors"
            pipe.add_lora(lora, 0.0)
            same = [im.tobytes() for im in samples(pipe, captions[:3])] == [
                im.tobytes() for im in samples(base, captions[:3])
            ]
            pipe.remove_loras()
            pipe.add_lora(lora)
            weights = next(
                Path(unnoise.__file__).parent.joinpath("models", "shapes-32").glob("model*.safetensors")
            )
            share = lora.stat().st_size / weights.stat().st_size
            lora_note = (
                f"LoRA file: {lora.stat().st_size:,} bytes, {share:.1%} of shapes-32's weights file"
                f" ({weights.stat().st_size:,} bytes, 16-bit); at scale 0 the base model's images bit for"
                f" bit: {same}"
            )
        else:
            pipe = unnoise.load(run_dir / "model", device="cpu")
        table[name] = {
            "shapes": shapes_eval(pipe, out / f"run-{i}-shapes.json", args.reuse),
            "distances": distances(samples(pipe, captions), own, everyone), "minutes": minutes,
            "folder_loss": folder_loss(pipe, captions, own[::2]),
        }  # fmt: skip
    lines = [
        "# Fine-tuning shapes-32 on 20 emoji (captions unrelated to shapes), 300 steps of 16",
        "",
        "| run | ShapesEval single | two objects | counting | binding | loss on the folder |"
        " samples: RMS to own image | to nearest folder image | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    categories = ("single", "two_objects", "counting", "binding")
    for name, r in table.items():
        scores = " | ".join(f"{r['shapes'][c]['accuracy']:.3f}" for c in categories)
        near = " | ".join(f"{d:.4f}" for d in r["distances"])
        lines.append(f"| {name} | {scores} | {r['folder_loss']:.4f} | {near} | {r['minutes']:.1f} |")
    lines += ["", lora_note]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fine_tune.md").write_text(text)
    (RESULTS / "fine_tune.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
