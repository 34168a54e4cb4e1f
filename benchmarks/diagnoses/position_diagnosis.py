"""Where do "left" and "right" get lost? The diagnosis of issue 11, step 1.

1. The judge on the data set's own renders, per caption form: does ShapesEval's checker read the column
   and row of single objects ("in the top left", ...), and the relation of two ("to the left of", ...),
   correctly from the images the model is trained on? If it did not, the model could not be blamed.
2. A linear probe of the frozen text encoder: from all-MiniLM-L6-v2's output for "a <colour> <shape>
   <position phrase>" (6 colours x 3 shapes x 2 sizes x 9 cells), can a linear map (ridge regression onto
   one-hot classes, closed form) tell the column, and the row? Features: the pooled (mean, normalised)
   sentence vector the UNet adds to its noise embedding, and the token states the cross-attention reads,
   concatenated in order. Held out: every caption of one colour at a time (6-fold), so the probe must
   generalise to captions it never saw. Chance is 1/3.
3. How far apart the encoder keeps the words a picture must tell apart (left/right, top/bottom, red/blue,
   circle/square), layer by layer: linearly separable is not the same as far apart, and a network learns
   a direction slowly when the states along it differ little.
4. The shipped model (`--model`): the position-word test per axis (does the true caption denoise better
   than its mirror?), the same with only the pooled vector or only the tokens mirrored (which path
   carries the position), and its cross-attention maps: where in the image each position word is read
   (the share of a word's attention, averaged over heads, layers and 8 noise draws at sigma 4, that falls
   in each third of the image).

Run: .venv/bin/python benchmarks/diagnoses/position_diagnosis.py   (about two minutes on 2 cores)
Writes benchmarks/diagnoses/results/position_diagnosis.md.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

from unnoise.data.shapes import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, SIZE_NAMES, ShapesDataset
from unnoise.eval.shapes_eval import detect, relation_holds
from unnoise.text.encoders import load_text_encoder

RESULTS = Path(__file__).parent / "results"


def judge_on_renders(samples: int = 3000) -> list[str]:
    """Rows of a table: per caption form, how often the judge reads the data set's truth."""
    data = ShapesDataset(resolution=32, seed=7)
    counts: dict[str, list[int]] = {}
    for index in range(samples):
        sample = data[index]
        scene, found = sample.scene, detect(sample.image)
        if scene.kind == "single" and "position" in scene.mentioned:
            form = "single, position stated"
            truth = POSITIONS.index(scene.objects[0].position_name)
            ok_col = ok_row = False
            if len(found) == 1:
                got = POSITIONS.index(found[0].position)
                ok_col, ok_row = got % 3 == truth % 3, got // 3 == truth // 3
            counts.setdefault(form + " (column)", []).append(ok_col)
            counts.setdefault(form + " (row)", []).append(ok_row)
        elif scene.kind == "relation":
            subject, reference = scene.objects
            by_colour = {(o.colour, o.shape): o for o in found}
            a, b = (
                by_colour.get((subject.colour, subject.shape)),
                by_colour.get((reference.colour, reference.shape)),
            )
            ok = (
                a is not None
                and b is not None
                and relation_holds(scene.relation, a.center, b.center, margin=3.2)
            )
            counts.setdefault(f"relation '{scene.relation}'", []).append(ok)
    return [f"| {form} | {len(v)} | {np.mean(v):.1%} |" for form, v in sorted(counts.items())]


def captions() -> list[tuple[str, int, str]]:
    """(caption, cell, colour) for every colour, shape, size and cell."""
    rows = []
    for colour, shape, size, cell in itertools.product(COLOURS, SHAPES, SIZE_NAMES, range(9)):
        article = "an" if size[0] in "aeiou" else "a"
        rows.append((f"{article} {size} {colour} {shape} {POSITION_PHRASES[POSITIONS[cell]]}", cell, colour))
    return rows


def ridge_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, ridge: float = 1.0) -> float:
    """Leave-one-group-out accuracy of ridge regression onto one-hot labels."""
    correct = 0
    for group in np.unique(groups):
        train, test = groups != group, groups == group
        x, mean = features[train], features[train].mean(0)
        std = x.std(0) + 1e-6
        x = (x - mean) / std
        y = np.eye(3)[labels[train]]
        w = np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(x.shape[1]), x.T @ y)
        predicted = (((features[test] - mean) / std) @ w).argmax(1)
        correct += int((predicted == labels[test]).sum())
    return correct / len(labels)


def probe() -> list[str]:
    rows = captions()
    encoder = load_text_encoder("minilm")
    with torch.no_grad():
        embedding = encoder.encode([caption for caption, _, _ in rows])
    pooled = embedding.pooled.numpy()  # (N, 384)
    tokens = embedding.tokens.flatten(1).numpy()  # (N, T * 384): token states in order, zero padded
    cells = np.array([cell for _, cell, _ in rows])
    groups = np.array([list(COLOURS).index(colour) for _, _, colour in rows])
    table = []
    for name, features in (("pooled sentence vector", pooled), ("token states, in order", tokens)):
        column = ridge_accuracy(features, cells % 3, groups)
        row = ridge_accuracy(features, cells // 3, groups)
        table.append(f"| {name} | {features.shape[1]} | {column:.1%} | {row:.1%} |")
    return table


WORD_PAIRS = (  # (caption, other caption, word, other word): captions that differ in one word
    ("a red circle in the top left", "a red circle in the top right", "left", "right"),
    ("a red circle in the top left", "a red circle in the bottom left", "top", "bottom"),
    ("a red circle", "a blue circle", "red", "blue"),
    ("a red circle", "a red square", "circle", "square"),
)


def word_distances() -> list[str]:
    """Rows: per word pair, the distance between the two words' states at each layer of MiniLM."""
    encoder = load_text_encoder("minilm")
    tokenizer, model = encoder.tokenizer, encoder.model
    rows = []
    for caption, other, word, other_word in WORD_PAIRS:
        states = []
        for text, w in ((caption, word), (other, other_word)):
            inputs = tokenizer([text], return_tensors="pt")
            index = inputs["input_ids"][0].tolist().index(tokenizer.convert_tokens_to_ids(w))
            hidden = model(**inputs, output_hidden_states=True).hidden_states  # layers 0 (embedding) .. L
            states.append(torch.stack([h[0, index] for h in hidden]))  # (L + 1, D)
        a, b = states
        first_last = ((a[0] + a[-1]) / 2 - (b[0] + b[-1]) / 2).norm()
        distances = " | ".join(f"{float(d):.1f}" for d in (a - b).norm(dim=1))
        rows.append(f"| {word} / {other_word} | {distances} | {float(first_last):.1f} |")
    header = " | ".join(f"layer {k}" for k in range(model.config.num_hidden_layers + 1))
    return [
        f"| words | {header} | mean of first and last |",
        "|---" + "|---:" * (model.config.num_hidden_layers + 2) + "|",
        *rows,
    ]


def which_path(model: str) -> list[str]:
    """Rows: the position-word test (sigma 4) per axis, with the whole caption, only its tokens, or only
    its pooled vector mirrored."""
    from dataclasses import replace

    from unnoise.eval.positions import compare, mirrored, paired_noise_errors, probe_samples
    from unnoise.pipeline import load

    pipe, generator, rows = load(model), torch.Generator().manual_seed(0), []
    for axis in ("horizontal", "vertical"):
        chosen = probe_samples(pipe.resolution, axis, 96)
        x0 = torch.stack([s.tensor() for s in chosen])  # (N, 3, R, R)
        true = pipe.text.encode([s.caption for s in chosen])
        wrong = pipe.text.encode([mirrored(s.caption, axis) for s in chosen])
        conditions = {
            "true": true,
            "all": wrong,
            "tokens": replace(wrong, pooled=true.pooled),
            "pooled": replace(true, pooled=wrong.pooled),
        }
        error = paired_noise_errors(pipe, x0, conditions, 4.0, generator)
        cells = []
        for k in ("all", "tokens", "pooled"):
            result = compare(error["true"], error[k])
            cells.append(f"{result['preferred']:.0%} ({result['gap']:+.0%})")
        rows.append(f"| {axis} | {' | '.join(cells)} |")
    return [
        "| axis | caption mirrored | tokens mirrored | pooled vector mirrored |",
        "|---|---:|---:|---:|",
        *rows,
    ]


def attention_thirds(model: str, draws: int = 8) -> list[str]:
    """Rows: for each position word, the share of its cross-attention in the left/centre/right columns
    and top/middle/bottom rows of the image (1/3 each if it is read everywhere alike)."""
    from unnoise.nn.layers import TransformerBlock
    from unnoise.pipeline import load

    pipe = load(model)
    maps: list[torch.Tensor] = []  # per cross-attention call: (B, T, R, R) attention, upsampled

    def record(module, args, kwargs, output):
        x, context, mask = args[0], args[1], kwargs.get("key_mask", args[2] if len(args) > 2 else None)
        b, n, _ = x.shape
        q = module.q(x).view(b, n, module.heads, -1).transpose(1, 2)  # (B, heads, N, d)
        k = module.kv(context).view(b, context.shape[1], 2, module.heads, -1)[:, :, 0].transpose(1, 2)
        if module.q_norm is not None:
            q, k = module.q_norm(q), module.k_norm(k)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, heads, N, T)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        side = round(n**0.5)
        weights = scores.softmax(-1).mean(1).transpose(1, 2).reshape(b, -1, side, side)  # (B, T, s, s)
        maps.append(torch.nn.functional.interpolate(weights, size=pipe.resolution, mode="nearest"))

    hooks = [
        m.cross_attention.register_forward_hook(record, with_kwargs=True)
        for m in pipe.denoiser.network.modules()
        if isinstance(m, TransformerBlock)
    ]
    rows = []
    for prompt, word in (
        ("a red circle on the left", "left"),
        ("a red circle on the right", "right"),
        ("a red circle at the top", "top"),
        ("a red circle at the bottom", "bottom"),
    ):
        maps.clear()
        cond = pipe.text.encode([prompt] * draws)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(draws, 3, pipe.resolution, pipe.resolution, generator=generator)
        pipe.denoiser(4.0 * noise, torch.full((draws,), 4.0), cond)
        index = pipe.text.encoder.tokenizer(prompt)["input_ids"].index(
            pipe.text.encoder.tokenizer.convert_tokens_to_ids(word)
        )
        attention = torch.stack([m[:, index] for m in maps]).mean((0, 1))  # (R, R)
        attention = attention / attention.sum()
        columns = [float(attention[:, part].sum()) for part in _thirds(pipe.resolution)]
        rows_ = [float(attention[part, :].sum()) for part in _thirds(pipe.resolution)]
        shares = [" / ".join(f"{v:.0%}" for v in part) for part in (columns, rows_)]
        rows.append(f"| {prompt} | {word} | {shares[0]} | {shares[1]} |")
    for hook in hooks:
        hook.remove()
    return [
        "| prompt | word | its attention in the left / centre / right columns"
        " | in the top / middle / bottom rows |",
        "|---|---|---:|---:|",
        *rows,
    ]


def _thirds(size: int) -> list[slice]:
    """Three slices of 0..size, as equal as whole pixels allow."""
    cuts = [round(size * k / 3) for k in range(4)]
    return [slice(cuts[k], cuts[k + 1]) for k in range(3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="shapes-32", help="the model for checks 4 (name or release folder)"
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    judge = judge_on_renders()
    probe_rows = probe()
    distances = word_distances()
    paths = which_path(args.model)
    thirds = attention_thirds(args.model)
    text = [
        "# Position diagnosis (issue 11)",
        "",
        f"`.venv/bin/python {' '.join(sys.argv)}`",
        "",
        "## The judge on the data set's own renders (3,000 samples, seed 7)",
        "",
        "| caption form | images | judge agrees with the truth |",
        "|---|---:|---:|",
        *judge,
        "",
        "## Linear probe of all-MiniLM-L6-v2 (ridge, held-out colour, chance 33%)",
        "",
        "| features | dimensions | column accuracy | row accuracy |",
        "|---|---:|---:|---:|",
        *probe_rows,
        "",
        "## How far apart all-MiniLM-L6-v2 keeps the words (L2 distance between the two words' states)",
        "",
        *distances,
        "",
        f"## Which path carries the position in `{args.model}` (position-word test at sigma 4, 96 images)",
        "",
        "How often the true caption denoises better than a mirrored one (chance 50%), and how much larger the"
        " mirrored one's error is.",
        "",
        *paths,
        "",
        f"## Where `{args.model}` reads the position words (cross-attention at sigma 4, 8 noise draws)",
        "",
        *thirds,
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "position_diagnosis.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
