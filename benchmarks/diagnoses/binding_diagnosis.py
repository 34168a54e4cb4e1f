"""Why a model pairs colours and shapes by chance: does the text carry the pairing, and does attention use it?

1. **The text.** For every prompt "a C1 S1 <and | above | below | to the left of> a C2 S2" (distinct colours
   and shapes, 720 prompts), a linear probe (softmax regression, 70% of the prompts to fit, 30% held out)
   reads each noun's colour from the noun's token state and each colour word's shape from its state: in the
   frozen encoder's states and in the model's refined ones (what its cross-attention reads). Chance is 17%
   for a colour and 33% for a shape.
2. **The attention.** The data set's own render of each two-object ShapesEval prompt (distinct colours and
   shapes) is noised to sigma and put through the network once. For the pixels of each object, at every
   cross-attention layer, the share of their attention on the two colour words that goes to the object's own
   colour, and the same for the two shape words. 50% is no binding: the pixels read both words alike.

Run: .venv/bin/python benchmarks/diagnoses/binding_diagnosis.py [MODEL] [--renders 2] [--out PATH]
Writes benchmarks/diagnoses/results/binding_diagnosis.md and .json (or --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from unnoise.data.shapes import COLOURS, SHAPES, render, to_tensor
from unnoise.errors import UnnoiseError
from unnoise.eval.shapes_eval import first_prompts, reference_scene
from unnoise.pipeline import load
from unnoise.train.grounding import cross_attention_blocks, recorded_cross_attention

RESULTS = Path(__file__).parent / "results"
TEMPLATES = (
    "a {} {} and a {} {}",
    "a {} {} above a {} {}",
    "a {} {} below a {} {}",
    "a {} {} to the left of a {} {}",
)
SIGMAS = (0.3, 0.8, 1.5, 3.0, 6.0)


def word_index(pieces: list[str], word: str, last: bool) -> int:
    """The position of `word` among the tokens: its first or its last occurrence."""
    return len(pieces) - 1 - pieces[::-1].index(word) if last else pieces.index(word)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, fit: int) -> float:
    """Held-out accuracy of softmax regression on standardised features (N, D), fitted on the first `fit`."""
    mean, std = features[:fit].mean(0), features[:fit].std(0) + 1e-5
    x = (features - mean) / std
    classes = int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(500):
        optimizer.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(x[:fit] @ weight + bias, labels[:fit])
            + 1e-3 * weight.square().sum()
        )
        loss.backward()
        optimizer.step()
    return ((x[fit:] @ weight + bias).argmax(1) == labels[fit:]).float().mean().item()


def text_probes(pipe) -> dict[str, dict[str, float]]:
    """Probe accuracy per question, for the encoder's states ("encoder") and the refined ones ("refined")."""
    colours = list(COLOURS)
    prompts = [
        (t.format(c1, s1, c2, s2), (c1, s1), (c2, s2))
        for t in TEMPLATES
        for c1, c2 in itertools.permutations(colours, 2)
        for s1, s2 in itertools.permutations(SHAPES, 2)
    ]
    random.Random(0).shuffle(prompts)
    questions = {  # name: (which object, read at its noun (True) or its colour word, the label)
        "first noun -> its colour": (0, True),
        "second noun -> its colour": (1, True),
        "first colour word -> its shape": (0, False),
        "second colour word -> its shape": (1, False),
    }
    states = {"encoder": {q: [] for q in questions}, "refined": {q: [] for q in questions}}
    labels = {q: [] for q in questions}
    with torch.no_grad():
        for prompt, *objects in prompts:
            text = pipe.text.encode([prompt])
            refined = pipe.denoiser.network.refine(text)
            pieces = pipe.text.token_strings(prompt)
            for q, (k, at_noun) in questions.items():
                colour, shape = objects[k]
                t = word_index(pieces, shape if at_noun else colour, last=k == 1)
                states["encoder"][q].append(text.tokens[0, t])
                states["refined"][q].append(refined.tokens[0, t])
                labels[q].append(colours.index(colour) if at_noun else SHAPES.index(shape))
    fit = int(0.7 * len(prompts))
    return {
        kind: {q: probe_accuracy(torch.stack(v), torch.tensor(labels[q]), fit) for q, v in by_q.items()}
        for kind, by_q in states.items()
    }


def attention_shares(pipe, renders: int) -> tuple[list[str], dict[float, list[list[float]]], int]:
    """(layer names, {sigma: per layer [own-colour share, own-shape share]}, scenes): see the docstring."""
    network = pipe.denoiser.network
    names = [name for name, _ in cross_attention_blocks(network)]
    specs = [
        s
        for s in first_prompts(24)
        if len(s.objects) == 2
        and len({o.colour for o in s.objects}) == 2
        and len({o.shape for o in s.objects}) == 2
    ]
    r = pipe.resolution
    sums = {sigma: np.zeros((len(names), 2)) for sigma in SIGMAS}
    counts = {sigma: np.zeros((len(names), 1)) for sigma in SIGMAS}
    yy, xx = np.mgrid[0:r, 0:r] + 0.5
    with torch.no_grad():
        for spec, seed in itertools.product(specs, range(renders)):
            scene = reference_scene(spec, r, seed=seed)  # its objects in the prompt's order
            x0 = to_tensor(render(scene))[None]  # (1, 3, R, R)
            text = pipe.text.encode([spec.prompt])
            pieces = pipe.text.token_strings(spec.prompt)
            words = [
                (word_index(pieces, o.colour, k == 1), word_index(pieces, o.shape, k == 1))
                for k, o in enumerate(spec.objects)
            ]
            inside = [
                ((xx - o.center[0]) ** 2 + (yy - o.center[1]) ** 2) <= (0.8 * o.radius) ** 2
                for o in scene.objects
            ]
            for sigma in SIGMAS:
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
                with recorded_cross_attention(network) as maps:
                    pipe.denoiser(x0 + sigma * noise, torch.tensor([sigma]), text)
                for layer, attention in enumerate(maps):  # (1, N, T)
                    side = round(attention.shape[1] ** 0.5)
                    f = r // side
                    for k, pixels in enumerate(inside):
                        cells = torch.from_numpy(
                            pixels.reshape(side, f, side, f).mean((1, 3)) > 0.5
                        ).flatten()
                        if not cells.any():
                            continue
                        a = attention[0, cells].mean(0)  # (T,)
                        (own_c, own_s), (other_c, other_s) = words[k], words[1 - k]
                        sums[sigma][layer] += [
                            (a[own_c] / (a[own_c] + a[other_c])).item(),
                            (a[own_s] / (a[own_s] + a[other_s])).item(),
                        ]
                        counts[sigma][layer] += 1
    shares = {sigma: (sums[sigma] / np.maximum(counts[sigma], 1)).tolist() for sigma in SIGMAS}
    return names, shares, len(specs) * renders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", nargs="?", default="shapes-32", help="a released model folder or a shipped name"
    )
    parser.add_argument("--renders", type=int, default=2, help="renders (scene seeds) per prompt")
    parser.add_argument("--out", default=str(RESULTS / "binding_diagnosis"))
    args = parser.parse_args()
    try:
        if args.renders < 1:
            raise UnnoiseError(f"--renders must be at least 1, got {args.renders}")
        pipe = load(args.model, device="cpu")
    except UnnoiseError as error:
        parser.error(str(error))
    if not pipe.denoiser.network.config.text_layers:
        parser.error(f"{args.model} has no text refiner; this diagnosis reads its refined token states")
    started = time.perf_counter()
    probes = text_probes(pipe)
    names, shares, scenes = attention_shares(pipe, args.renders)
    seconds = time.perf_counter() - started

    command = (
        f"`.venv/bin/python benchmarks/diagnoses/binding_diagnosis.py {args.model} --renders {args.renders}"
    )
    command += "`" if args.out == parser.get_default("out") else f" --out {args.out}`"
    lines = [
        "# Binding diagnosis: does the text carry which colour goes with which shape, and does attention"
        " use it?",
        "",
        f"{command}; {seconds:.0f} s.",
        "",
        "## 1. The text: linear probes, held-out accuracy (chance: colour 17%, shape 33%)",
        "",
        "| question | frozen encoder's states | refined states (cross-attention reads these) |",
        "|---|---:|---:|",
        *(f"| {q} | {probes['encoder'][q]:.0%} | {probes['refined'][q]:.0%} |" for q in probes["encoder"]),
        "",
        f"## 2. The attention: own-word share, colour / shape, over {scenes} renders of two-object prompts"
        " (50% = no binding)",
        "",
        "| layer | " + " | ".join(f"sigma {s:g}" for s in SIGMAS) + " |",
        "|---|" + "---:|" * len(SIGMAS),
        *(
            f"| {name} | "
            + " | ".join(f"{shares[s][i][0]:.0%} / {shares[s][i][1]:.0%}" for s in SIGMAS)
            + " |"
            for i, name in enumerate(names)
        ),
    ]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    report = {"model": args.model, "renders": args.renders, "probes": probes, "layers": names,
              "attention_shares": {str(s): v for s, v in shares.items()}}  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
