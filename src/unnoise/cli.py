"""The `unnoise` command: a thin adapter over the library. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_samplers(args: argparse.Namespace) -> int:
    from .diffusion.samplers import SAMPLERS, STOCHASTIC

    for name in sorted(SAMPLERS):
        doc = (SAMPLERS[name].__doc__ or "").strip().splitlines()[0]
        kind = "stochastic" if name in STOCHASTIC else "deterministic"
        print(f"{name:<16} {kind:<13} {doc}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=Path(args.out), steps=args.steps, samples=args.samples, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="unnoise", description="Text-to-image diffusion, trained and run on your machine."
    )
    parser.add_argument("--version", action="version", version=f"unnoise {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("samplers", help="list the samplers, one line each")
    p.set_defaults(run=_cmd_samplers)

    p = sub.add_parser("demo", help="run every sampler on an exact 2-D Gaussian mixture and draw the result")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--samples", type=int, default=2000, help="points per sampler (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="folder for demo.png (default ./out)")
    p.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import UnnoiseError

    try:
        return args.run(args)
    except UnnoiseError as error:
        print(f"unnoise: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unnoise: interrupted", file=sys.stderr)
        return 130
