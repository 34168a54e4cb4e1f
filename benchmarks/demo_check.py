"""`make demo` judged: "a red circle above a blue square", seeds 0 to 7, the model's defaults, with and
without attribute binding; ShapesEval's checker on each image, and what it found.

Run: .venv/bin/python benchmarks/demo_check.py [MODEL]   (prints a table; writes nothing)
"""

from __future__ import annotations

import argparse

from unnoise.eval.shapes_eval import ExpectedObject, PromptSpec, check, detect
from unnoise.pipeline import load

DEMO = PromptSpec(
    "a red circle above a blue square",
    "two_objects",
    (ExpectedObject("red", "circle"), ExpectedObject("blue", "square")),
    "above",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model", nargs="?", default="shapes-32", help="a released model folder or a shipped name"
    )
    args = parser.parse_args()
    pipe = load(args.model)
    print("| attribute binding | right (of 8) | objects found, seeds 0 to 7 |\n|---|---:|---|")
    for bind in (False, True):
        images = pipe.generate(DEMO.prompt, seed=0, num_images=8, bind_attributes=bind)
        right = sum(check(image, DEMO)[0] for image in images)
        found = "; ".join(", ".join(sorted(f"{o.colour} {o.shape}" for o in detect(im))) for im in images)
        print(f"| {'on' if bind else 'off'} | {right} | {found} |")


if __name__ == "__main__":
    main()
