"""Where do "left" and "right" get lost? Two checks that need no trained model (issue 11, step 1).

1. The judge on the data set's own renders, per caption form: does ShapesEval's checker read the column
   and row of single objects ("in the top left", ...), and the relation of two ("to the left of", ...),
   correctly from the images the model is trained on? If it did not, the model could not be blamed.
2. A linear probe of the frozen text encoder: from all-MiniLM-L6-v2's output for "a <colour> <shape>
   <position phrase>" (6 colours x 3 shapes x 2 sizes x 9 cells), can a linear map (ridge regression onto
   one-hot classes, closed form) tell the column, and the row? Features: the pooled (mean, normalised)
   sentence vector the UNet adds to its noise embedding, and the token states the cross-attention reads,
   concatenated in order. Held out: every caption of one colour at a time (6-fold), so the probe must
   generalise to captions it never saw. Chance is 1/3.

Run: .venv/bin/python benchmarks/position_diagnosis.py   (about a minute on 2 cores)
Writes benchmarks/results/position_diagnosis.md.
"""

from __future__ import annotations

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


def main() -> None:
    torch.set_grad_enabled(False)
    judge = judge_on_renders()
    probe_rows = probe()
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
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "position_diagnosis.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
