"""Does a noun's cross-attention steer the shape a model draws? An edit at inference, judged by ShapesEval.

`benchmarks/binding_diagnosis.py` found the pixels of each object attending to their own colour word but to
both shape words alike. This asks whether that is why shapes are paired with colours by chance: at every
cross-attention layer, in the conditional half of classifier-free guidance only, each pixel's attention to
the shape words is redistributed in proportion to its attention to their colour words (SynGen, Rassin et
al. 2023, and Structured Diffusion Guidance, Feng et al. 2023, bind attributes in attention too; this edit
needs no gradient and no extra network call):

    m_i(u) = sum of A(u, t) over the colour word of object i             A: attention (heads apart)
    s_i(u) = softmax_i(gamma log m_i(u))                                  gamma = `--sharpness`
    A'(u, t) = [sum over all shape words t' of A(u, t')] s_i(u) A(u, t) / [sum over object i's shape word]

for t a shape word of object i; every other token keeps its attention, so rows still sum to 1. If the
shape the network draws follows where its shape words are read, the edited images pair colours and shapes
better; if shapes come from elsewhere (the pooled text vector, say), nothing changes.

The judge: ShapesEval's two-object and binding prompts (the first `--prompts` of each), `--samples` images
each, the model's default guidance, DPM-Solver++(2M), 20 steps, the same seeds with and without the edit.
Besides ShapesEval's verdict, for every stated colour of a prompt whose colours are distinct: "bound" when
the objects drawn in that colour are all of its shape, "wrong" when any is another shape, "absent" when no
object has that colour.

Run: .venv/bin/python benchmarks/attention_steering.py [MODEL] [--prompts 12] [--samples 4] [--sharpness 8]
Writes benchmarks/results/attention_steering.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from unnoise.eval.shapes_eval import PromptSpec, check, first_prompts
from unnoise.nn.layers import attention_probabilities
from unnoise.pipeline import load
from unnoise.train.grounding import cross_attention_blocks

RESULTS = Path(__file__).parent / "results"
CATEGORIES = ("two_objects", "binding")


def object_words(pieces: list[str], spec: PromptSpec) -> list[tuple[int, int]]:
    """(colour token, shape token) of each object, in the prompt's order: a colour word and the shape word
    after it ("a red circle ..."; counting's plurals do not occur in these categories)."""
    words, start = [], 0
    for obj in spec.objects:
        colour = pieces.index(obj.colour, start)
        shape = pieces.index(obj.shape, colour)
        words.append((colour, shape))
        start = shape + 1
    return words


def steered(probabilities: torch.Tensor, words: list[tuple[int, int]], sharpness: float) -> torch.Tensor:
    """The edit above on probabilities (B, heads, N, T) for objects' (colour, shape) token positions."""
    colours, shapes = [c for c, _ in words], [s for _, s in words]
    colour_attention = probabilities[..., colours].float()  # (B, heads, N, objects)
    share = (sharpness * colour_attention.clamp_min(1e-12).log()).softmax(-1)
    shape_mass = probabilities[..., shapes].float().sum(-1, keepdim=True)  # (B, heads, N, 1)
    edited = probabilities.clone()
    edited[..., shapes] = (shape_mass * share).to(probabilities.dtype)  # one token per shape word
    return edited


@contextlib.contextmanager
def steering(network: torch.nn.Module, state: dict) -> Iterator[None]:
    """While open, every cross-attention's output is recomputed with the edit for the conditional rows
    (those with more than the empty prompt's two tokens) whenever `state["words"]` is set."""

    def hook(module, args, output):
        queries, tokens, key_mask = args
        words = state.get("words")
        if not words or key_mask is None:
            return output
        q, k, v = module.heads_of(queries, tokens)
        probabilities = attention_probabilities(q, k, key_mask)  # (B, heads, N, T)
        conditional = key_mask.sum(1) > 2  # (B,)
        probabilities[conditional] = steered(probabilities[conditional], words, state["sharpness"])
        h = probabilities @ v  # (B, heads, N, d)
        return module.out(h.transpose(1, 2).reshape(queries.shape))

    handles = [b.cross_attention.register_forward_hook(hook) for _, b in cross_attention_blocks(network)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def judge(pipe, specs: list[PromptSpec], samples: int, state: dict) -> dict:
    right, colours = Counter(), Counter()
    for spec in specs:
        state["words"] = object_words(pipe.text.token_strings(spec.prompt), spec) if state["on"] else None
        images = pipe.generate(spec.prompt, seed=0, num_images=samples, steps=20, sampler="dpmpp_2m")
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
    parser.add_argument("--sharpness", type=float, default=8.0, help="gamma of the colour shares")
    parser.add_argument("--out", default=str(RESULTS / "attention_steering"))
    args = parser.parse_args()
    start = time.perf_counter()
    pipe = load(args.model)
    specs = [s for s in first_prompts(args.prompts) if s.category in CATEGORIES]
    state = {"sharpness": args.sharpness}
    results = {}
    with steering(pipe.denoiser.network, state):
        for name, on in (("as trained", False), ("steered by colour words", True)):
            state["on"] = on
            results[name] = judge(pipe, specs, args.samples, state)
            print(name, results[name], flush=True)
    wall = time.perf_counter() - start
    command = f"`.venv/bin/python benchmarks/attention_steering.py {args.model} --prompts {args.prompts}"
    command += f" --samples {args.samples} --sharpness {args.sharpness:g}`"
    markdown = "\n".join(
        [
            "# Attention steering: does where a shape word is read decide the shape drawn?",
            "",
            f"{command}; guidance {pipe.default_guidance:g} (the model's), DPM-Solver++(2M), 20 steps,"
            f" the same seeds in both rows; {wall:.0f} s.",
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
