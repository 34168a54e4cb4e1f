"""Why a model fails ShapesEval's scenes of several objects: the same prompts under other sampling
settings, and with the pooled text vector taken away, against the eval's own settings in the same run.

For each variant and category it prints the accuracy, the mean number of objects found beyond those the
prompt asks for (a model that hedges between layouts draws several), and how often the set of colours
found is exactly the prompt's (a colour that leaks from one object onto another breaks it). Variants:

    default          the eval's settings: dpmpp_2m, 20 steps, guidance 3 (the baseline)
    guidance 1.5, 6  less and more classifier-free guidance
    euler_ancestral  fresh noise at every step, which lets the sampler drop a half-drawn object
    50 steps         whether the step count is the limit
    no pooled text   the network's pooled-text input zeroed by a forward pre-hook on `pooled_text`, so only
                     cross-attention carries the prompt: if the scores hold, the pooled vector (which
                     modulates every residual block alike) is not where colours go wrong

The images are ShapesEval's first `--prompts` prompts of each category, seeds 0.. `--samples`-1; every
variant draws from the same seeds.

Run: .venv/bin/python benchmarks/diagnoses/composition_diagnosis.py MODEL [--prompts 12] [--samples 2]
Writes benchmarks/diagnoses/results/composition_diagnosis.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unnoise.errors import UnnoiseError
from unnoise.eval.shapes_eval import CATEGORIES, evaluate, first_prompts
from unnoise.pipeline import load
from unnoise.settings import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Variant:
    name: str
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    pooled_text: bool = True


VARIANTS = (
    Variant("default"),
    Variant("guidance 1.5", guidance=1.5),
    Variant("guidance 6", guidance=6.0),
    Variant("euler_ancestral", sampler="euler_ancestral"),
    Variant("50 steps", steps=50),
    Variant("no pooled text", pooled_text=False),
)


@contextlib.contextmanager
def without_pooled_text(network: torch.nn.Module):
    """The network's pooled-text projection sees zeros (its output is its bias) while inside."""
    handle = network.pooled_text.register_forward_pre_hook(lambda module, args: (torch.zeros_like(args[0]),))
    try:
        yield
    finally:
        handle.remove()


def judge(pipe, variant: Variant, prompts: int, samples: int) -> dict[str, dict[str, float]]:
    """Per category: accuracy, mean objects found beyond those asked for, share of images whose colours
    are exactly the prompt's; ShapesEval's `evaluate` draws and judges the images."""

    def generate(prompt: str, seed: int, n: int):
        return pipe.generate(
            prompt, seed=seed, num_images=n, sampler=variant.sampler, steps=variant.steps,
            guidance=variant.guidance,
        )  # fmt: skip

    hook = contextlib.nullcontext() if variant.pooled_text else without_pooled_text(pipe.denoiser.network)
    with hook:
        report = evaluate(generate, first_prompts(prompts), samples)
    results = {}
    for category, scores in report.categories().items():
        judged = [(r.spec, d) for r in report.results if r.spec.category == category for d in r.details]
        extra = [len(d["found"]) - len(spec.objects) for spec, d in judged]
        colours = [
            {f["colour"] for f in d["found"]} == {o.colour for o in spec.objects} for spec, d in judged
        ]
        results[category] = {
            "accuracy": scores["accuracy"],
            "extra_objects": sum(extra) / len(judged),
            "colours_right": sum(colours) / len(judged),
        }
    return results


def table(results: dict[str, dict]) -> list[str]:
    header = " | ".join(f"{c} acc / extra / colours" for c in CATEGORIES)
    lines = [f"| variant | {header} | overall vs default |", "|---" + "|---:" * (len(CATEGORIES) + 1) + "|"]
    base = sum(v["accuracy"] for v in results["default"].values())
    for name, by_category in results.items():
        cells = [
            f"{r['accuracy']:.0%} / {r['extra_objects']:+.2f} / {r['colours_right']:.0%}"
            for r in by_category.values()
        ]
        total = sum(v["accuracy"] for v in by_category.values())
        ratio = f"{total / base:.2f}x" if base else "n/a"
        lines.append(f"| {name} | {' | '.join(cells)} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a released model folder or a shipped model's name")
    parser.add_argument("--prompts", type=int, default=12, help="ShapesEval prompts per category")
    parser.add_argument("--samples", type=int, default=2, help="images per prompt")
    parser.add_argument("--out", default=str(RESULTS / "composition_diagnosis"))
    args = parser.parse_args()

    try:
        first_prompts(args.prompts)
        if args.samples < 1:
            raise UnnoiseError(f"--samples must be at least 1, got {args.samples}")
        pipe = load(args.model)
    except UnnoiseError as error:
        parser.error(str(error))
    started, results = time.perf_counter(), {}
    for variant in VARIANTS:
        results[variant.name] = judge(pipe, variant, args.prompts, args.samples)
        print(variant.name, json.dumps(results[variant.name]), flush=True)
    script = "benchmarks/diagnoses/composition_diagnosis.py"
    command = f"`.venv/bin/python {script} {args.model} --prompts {args.prompts}"
    command += f" --samples {args.samples}`"
    lines = [
        "# Composition diagnosis",
        "",
        f"{command}: ShapesEval's first {args.prompts} prompts per category x {args.samples} images, same"
        f" seeds for every variant; {time.perf_counter() - started:.0f} s.",
        "",
        "Each cell: accuracy / mean objects found beyond those asked for / share of images whose colours are"
        " exactly the prompt's.",
        "",
        *table(results),
    ]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"model": args.model, "results": results}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
