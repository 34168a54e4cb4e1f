"""At which noise level a model loses a scene's composition: correct scenes noised and denoised again.

For each ShapesEval category, the data set's own render of each prompt (`reference_scene`, which the judge
reads right) is noised to a starting level sigma_k of the eval's 20-step schedule and denoised from there
with the eval's sampler and guidance (img2img, SDEdit). A model that knew the scene's rules at every noise
level would give back a correct scene from any start; where accuracy falls, the model stops holding the
composition (the count, which colour goes with which shape, the relation) and starts inventing one. The
highest start is plain generation from noise, the baseline.

Beside each start, the share of training noise levels at or above it, for the log-normal density given
(`--p-mean`, `--p-std`: EDM's defaults -1.2 and 1.2, or the run's `--sigma-p-mean`): the training signal
a recipe spends where the composition is decided.

Run: .venv/bin/python benchmarks/diagnoses/decision_sigma.py MODEL [--prompts 12] [--samples 2]
    [--p-mean -0.6]
Writes benchmarks/diagnoses/results/decision_sigma.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from PIL import Image

from unnoise.data.shapes import render
from unnoise.diffusion.editing import img2img_start
from unnoise.diffusion.schedules import default_sigmas
from unnoise.errors import UnnoiseError
from unnoise.eval.shapes_eval import CATEGORIES, PromptSpec, check, first_prompts, reference_scene
from unnoise.pipeline import load
from unnoise.settings import DEFAULT_STEPS

RESULTS = Path(__file__).parent / "results"
STRENGTHS = (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 1.0)  # the last round(20 s) of the 20 steps run


def share_above(sigma: float, p_mean: float, p_std: float) -> float:
    """P(sigma_train >= sigma) for ln sigma_train ~ N(p_mean, p_std^2)."""
    z = (math.log(sigma) - p_mean) / p_std
    return 0.5 * math.erfc(z / math.sqrt(2))


def strength_list(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def redrawn(pipe, spec: PromptSpec, truth: Image.Image, seed: int, strength: float) -> bool:
    """Whether `truth`, a render of `spec`, noised and denoised from `strength` is still judged right. The
    noise comes from `seed` (the scene's), so every start sees the same noise."""
    image = pipe.edit(truth, spec.prompt, strength=strength, seed=seed)[0]
    return check(image, spec)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a released model folder or a shipped model's name")
    parser.add_argument("--prompts", type=int, default=12, help="ShapesEval prompts per category")
    parser.add_argument("--samples", type=int, default=2, help="renders per prompt (scene seeds 0..)")
    parser.add_argument("--p-mean", type=float, default=-1.2, help="training density: mean of ln sigma")
    parser.add_argument("--p-std", type=float, default=1.2, help="training density: std of ln sigma")
    parser.add_argument(
        "--strengths", type=strength_list, default=STRENGTHS,
        help="comma-separated img2img strengths in (0, 1]: where on the schedule each start is",
    )  # fmt: skip
    parser.add_argument("--out", default=str(RESULTS / "decision_sigma"))
    args = parser.parse_args()

    try:
        specs = first_prompts(args.prompts)
        if args.samples < 1:
            raise UnnoiseError(f"--samples must be at least 1, got {args.samples}")
        if not all(0 < v <= 1 for v in args.strengths):
            raise UnnoiseError(f"--strengths must lie in (0, 1], got {args.strengths}")
        if not args.p_std > 0:
            raise UnnoiseError(f"--p-std must be positive, got {args.p_std}")
        pipe = load(args.model)
    except UnnoiseError as error:
        parser.error(str(error))
    sigmas = default_sigmas(pipe.denoiser.formulation, DEFAULT_STEPS)
    scenes = [  # (spec, scene seed, its render), drawn once for every start
        (spec, s, Image.fromarray(render(reference_scene(spec, pipe.resolution, seed=s))))
        for spec in specs
        for s in range(args.samples)
    ]
    started, rows = time.perf_counter(), []
    for strength in args.strengths:
        start = float(sigmas[img2img_start(DEFAULT_STEPS, strength)])
        right = {c: [] for c in CATEGORIES}
        for spec, seed, truth in scenes:
            right[spec.category].append(redrawn(pipe, spec, truth, seed, strength))
        row = {
            "strength": strength,
            "start_sigma": start,
            "training_share_above": share_above(start, args.p_mean, args.p_std),
            "accuracy": {c: sum(v) / len(v) for c, v in right.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    command = (
        f"`.venv/bin/python benchmarks/diagnoses/decision_sigma.py {args.model} --prompts {args.prompts}"
    )
    command += f" --samples {args.samples} --p-mean {args.p_mean} --p-std {args.p_std}"
    if args.strengths != STRENGTHS:
        command += " --strengths " + ",".join(str(v) for v in args.strengths)
    command += "`" if args.out == parser.get_default("out") else f" --out {args.out}`"
    lines = [
        "# Where composition is decided",
        "",
        f"{command}: the data set's renders of ShapesEval's first {args.prompts} prompts per category"
        f" ({args.samples} scenes each), noised to the start and denoised with DPM-Solver++(2M), guidance"
        f" {pipe.default_guidance:g} (the model's default),"
        f" on the 20-step schedule; {time.perf_counter() - started:.0f} s. The last row is plain generation.",
        "",
        "| strength | start sigma | training levels at or above | " + " | ".join(CATEGORIES) + " |",
        "|---:|---:|---:|" + "---:|" * len(CATEGORIES),
    ]
    for row in rows:
        cells = " | ".join(f"{row['accuracy'][c]:.0%}" for c in CATEGORIES)
        share = row["training_share_above"]
        lines.append(f"| {row['strength']} | {row['start_sigma']:.2f} | {share:.1%} | {cells} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
