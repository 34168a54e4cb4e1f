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


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.loop import train

    given = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__ if hasattr(args, name)}
    saved = Path(given.get("out", TrainConfig.out)) / "config.json"
    if args.resume and saved.is_file():  # continue with the run's own settings, overridden by the flags given
        config = TrainConfig.from_dict({**TrainConfig.load(saved).__dict__, **given})
    else:
        config = TrainConfig(**given)
    train(config, resume=args.resume)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import secrets

    from tqdm import tqdm

    from .errors import UnnoiseError
    from .images import contact_sheet
    from .pipeline import load, read_png_parameters, save_png

    if args.from_png:
        request = read_png_parameters(args.from_png)
        args.prompt, args.negative, args.sampler = request.prompt, request.negative_prompt, request.sampler
        args.steps, args.guidance, args.seed, args.n = request.steps, request.guidance, request.seed, 1
        args.model = args.model or request.model
    if args.prompt is None:
        raise UnnoiseError("give a PROMPT, or --from-png FILE")
    pipe = load(args.model or "shapes-32")
    seed = secrets.randbelow(2**31) if args.seed is None else args.seed  # image i: seed + i
    with tqdm(total=args.steps, unit="step", leave=False) as bar:
        images = pipe.generate(
            args.prompt,
            negative_prompt=args.negative,
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            seed=seed,
            num_images=args.n,
            callback=lambda step: bar.update(1) if step.index < args.steps else None,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        print(save_png(image, out / f"{seed + i}.png"))
    if len(images) > 1:
        print(save_png(contact_sheet(images, scale=max(1, 128 // images[0].width)), out / "sheet.png"))
    return 0


def _cmd_eval_shapes(args: argparse.Namespace) -> int:
    import json

    from .eval.shapes_eval import run_shapes_eval

    report = run_shapes_eval(
        args.model,
        samples_per_prompt=args.samples,
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        prompts_per_category=args.prompts_per_category,
    )
    print(report.table())
    path = Path(args.report)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(report.to_dict(), indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


def add_config_arguments(parser: argparse.ArgumentParser, config_class) -> None:
    """One --flag per dataclass field, typed from its default (Literal fields become choices).

    Flags not given are absent from the parsed namespace, so a resumed run can keep its saved values.
    """
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        hint, default = hints[field.name], field.default
        shown = {"default": argparse.SUPPRESS, "help": f"(default: {default})"}
        if typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), **shown)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **shown)
        elif default is None:
            parser.add_argument(flag, type=int, **shown)
        else:
            parser.add_argument(flag, type=type(default), **shown)


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

    p = sub.add_parser("generate", help="generate images from a prompt with a released model")
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument("-n", type=int, default=1, help="number of images; image i uses seed + i (default 1)")
    p.add_argument("--seed", type=int, default=None, help="default: random")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m", help="see `unnoise samplers` (default dpmpp_2m)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; 1 = none")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--model", default=None, help="a shipped model's name or a release folder")
    p.add_argument("--out", default="out", help="folder for the PNGs (default ./out)")
    p.add_argument("--from-png", default=None, help="re-create an image from the parameters in its PNG")
    p.set_defaults(run=_cmd_generate)

    p = sub.add_parser("eval", help="evaluate a model")
    suites = p.add_subparsers(dest="suite", required=True)
    p = suites.add_parser(
        "shapes", help="ShapesEval: exact prompt alignment on the shapes grammar, no judge model"
    )
    p.add_argument("--model", default="shapes-32", help="a shipped model's name or a release folder")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prompts-per-category",
        type=int,
        default=24,
        help="the first K prompts of each category, for a quick look (default: all 24)",
    )
    p.add_argument("--report", default="shapes_eval.json", help="where the JSON report goes")
    p.set_defaults(run=_cmd_eval_shapes)

    from .train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a text-to-image model on the built-in shapes or a folder of captioned images",
        description="Train a text-conditioned diffusion model. Works on a CPU; under"
        " `torchrun --nproc_per_node N` it trains with DistributedDataParallel."
        " Kill it at any time and rerun with --resume.",
    )
    add_config_arguments(p, TrainConfig)
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last good checkpoint"
    )
    p.set_defaults(run=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import UnnoiseError

    try:
        return args.run(args)
    except UnnoiseError as error:
        print(f"unnoise: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder we may not write, a full disk: the system's own words suffice
        print(f"unnoise: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("unnoise: interrupted", file=sys.stderr)
        return 130
