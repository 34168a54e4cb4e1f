"""An autoencoder's picture for its card: held-out images (top row) and their reconstructions (below).

The images are the first `--count` held-out captions of the folder's concept split (the split `train
--held-out` and `unnoise eval folder` use), so the autoencoder never saw them; each reconstruction is
decode(encode(image)) through the codec the release carries, with its PSNR in the label.

Run: .venv/bin/python benchmarks/autoencoder_sheet.py --model emoji-64 \
         --data ../shared/datasets/emoji-noto-64 --out reconstructions.png [--count 8]
"""

from __future__ import annotations

import argparse

import torch

import unnoise
from unnoise.data.folder import to_unit_range
from unnoise.eval.folder_eval import first_of_each_caption, split_folder
from unnoise.images import contact_sheet, psnr, to_pil


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a latent model (its autoencoder/) or its name")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()
    pipe = unnoise.load(args.model)
    split = split_folder(args.data, pipe.resolution, held_out=0.1, seed=0)
    pixels, captions = first_of_each_caption(split.held_pixels, split.held_captions, args.count, seed=0)
    x = to_unit_range(pixels)  # (N, 3, R, R) in [-1, 1]
    y = pipe.codec.decode(pipe.codec.encode(x))
    scores = psnr(y, x).tolist()
    images = to_pil(x) + to_pil(y)
    labels = captions + [f"{s:.1f} dB" for s in scores]
    contact_sheet(images, labels, scale=args.scale, columns=len(captions)).save(args.out)
    print(f"wrote {args.out}: mean PSNR {sum(scores) / len(scores):.2f} dB over {len(scores)} images")


if __name__ == "__main__":
    main()
