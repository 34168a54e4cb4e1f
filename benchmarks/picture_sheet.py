"""A model card's picture sheet: captions in rows, seeds in columns, each image captioned, one PNG.

Run: .venv/bin/python benchmarks/picture_sheet.py --model emoji-64 --out sheet.png --seeds 4 \
         "red apple" "grinning face" "a blue heart"
     (or --captions-file FILE, one caption a line). Guidance and steps: the model's defaults unless given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import unnoise
from unnoise.images import contact_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions", nargs="*")
    parser.add_argument("--captions-file", default=None)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scale", type=int, default=2, help="each image enlarged this many times (nearest)")
    args = parser.parse_args()
    captions = list(args.captions)
    if args.captions_file:
        captions += [
            line.strip() for line in Path(args.captions_file).read_text().splitlines() if line.strip()
        ]
    pipe = unnoise.load(args.model)
    images, labels = [], []
    for caption in captions:
        images += pipe.generate(
            caption, seed=0, num_images=args.seeds, steps=args.steps, guidance=args.guidance
        )
        labels += [caption] * args.seeds
    contact_sheet(images, labels, scale=args.scale, columns=args.seeds).save(args.out)
    print(f"wrote {args.out}: {len(captions)} captions x {args.seeds} seeds")


if __name__ == "__main__":
    main()
