"""Does a noun's cross-attention steer the shape a model draws? Attribute binding, judged by ShapesEval.

`benchmarks/diagnoses/binding_diagnosis.py` found the pixels of each object attending to their own colour
word but to
both shape words alike. This asks whether that is why shapes are paired with colours by chance: with
`bind_attributes=True` (`unnoise.nn.layers.bind_attention`), at every cross-attention layer and in the
conditional half of classifier-free guidance only, each pixel's attention to the nouns is redistributed in
proportion to its attention to their attributes (SynGen, Rassin et al. 2023, and Structured Diffusion
Guidance, Feng et al. 2023, bind attributes in attention too; this edit needs no gradient and no extra
network call). If the shape the network draws follows where its shape words are read, the bound images pair
colours and shapes better; if shapes come from elsewhere (the pooled text vector, say), nothing changes.

The judge: ShapesEval's two-object and binding prompts (the first `--prompts` of each), `--samples` images
each, the model's default guidance, DPM-Solver++(2M), 20 steps, the same seeds in every row. Besides
ShapesEval's verdict, for every stated colour of a prompt whose colours are distinct: "bound" when the
objects drawn in that colour are all of its shape, "wrong" when any is another shape, "absent" when no
object has that colour. `--sharpness` lists the gammas of the attribute shares to measure
(`nn.layers.BINDING_SHARPNESS` is the one shipped).

Run: .venv/bin/python benchmarks/diagnoses/attention_steering.py [MODEL] [--prompts 12] [--samples 4]
    [--sharpness 8]
Writes benchmarks/diagnoses/results/attention_steering.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from unnoise.eval.shapes_eval import PromptSpec, check, first_prompts
from unnoise.nn import layers
from unnoise.pipeline import load

RESULTS = Path(__file__).parent / "results"
CATEGORIES = ("two_objects", "binding")


def colour_binding(spec: PromptSpec, found: list[dict]) -> list[str]:
    """bound / wrong / absent for each stated colour of a prompt with distinct colours (else nothing)."""
    colours = [o.colour for o in spec.objects]
    if len(set(colours)) != len(colours):
        return []
    verdicts = []
    for obj in spec.objects:
        shapes = {f["shape"] for f in found if f["colour"] == obj.colour}
        verdicts.append("absent" if not shapes else "bound" if shapes == {obj.shape} else "wrong")
    return verdicts


def judge(pipe, specs: list[PromptSpec], samples: int, bind: bool) -> dict:
    right, colours = Counter(), Counter()
    for spec in specs:
        images = pipe.generate(
            spec.prompt, seed=0, num_images=samples, steps=20, sampler="dpmpp_2m", bind_attributes=bind
        )
        for image in images:
            correct, details = check(image, spec)
            right[spec.category] += correct
            colours.update((spec.category, v) for v in colour_binding(spec, details["found"]))
    return {
        category: {
            "correct": right[category],
            "images": samples * sum(s.category == category for s in specs),
            **{v: colours[category, v] for v in ("bound", "wrong", "absent")},
        }
        for category in CATEGORIES
    }


def table(results: dict[str, dict]) -> list[str]:
    lines = [
        "| attention | two objects right | binding right | two objects: colours bound"
        " | binding: colours bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        cells = [f"{r[c]['correct']} / {r[c]['images']}" for c in CATEGORIES]
        for c in CATEGORIES:
            n = r[c]["bound"] + r[c]["wrong"] + r[c]["absent"]
            cells.append(f"{100 * r[c]['bound'] / n:.0f}% ({r[c]['bound']} / {n}; {r[c]['wrong']} wrong)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", nargs="?", default="shapes-32", help="a released model folder or a shipped name"
    )
    parser.add_argument("--prompts", type=int, default=12, help="ShapesEval prompts per category")
    parser.add_argument("--samples", type=int, default=4, help="images per prompt")
    parser.add_argument(
        "--sharpness",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[layers.BINDING_SHARPNESS],
        help=f"gammas of the attribute shares, comma-separated (default {layers.BINDING_SHARPNESS:g})",
    )
    parser.add_argument("--out", default=str(RESULTS / "attention_steering"))
    args = parser.parse_args()
    start = time.perf_counter()
    pipe = load(args.model)
    specs = [s for s in first_prompts(args.prompts) if s.category in CATEGORIES]
    results = {"as trained": judge(pipe, specs, args.samples, False)}
    print(results, flush=True)
    for gamma in args.sharpness:
        layers.BINDING_SHARPNESS = gamma  # read by bind_attention at each call
        results[f"attributes bound, gamma {gamma:g}"] = judge(pipe, specs, args.samples, True)
        print(results, flush=True)
    wall = time.perf_counter() - start
    command = (
        f"`.venv/bin/python benchmarks/diagnoses/attention_steering.py {args.model} --prompts {args.prompts}"
    )
    command += f" --samples {args.samples} --sharpness {','.join(f'{g:g}' for g in args.sharpness)}`"
    markdown = "\n".join(
        [
            "# Attention steering: does where a shape word is read decide the shape drawn?",
            "",
            f"{command}; guidance {pipe.default_guidance:g} (the model's), DPM-Solver++(2M), 20 steps,"
            f" the same seeds in every row; {wall:.0f} s.",
            "",
            *table(results),
            "",
        ]
    )
    print(markdown)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    record = {"settings": vars(args), "guidance": pipe.default_guidance, "results": results, "wall_s": wall}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
