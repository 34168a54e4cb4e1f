"""The `unnoise` command: a thin adapter over the library. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path


def _cmd_samplers(args: argparse.Namespace) -> int:
    from .diffusion.samplers import SAMPLERS, STOCHASTIC
    from .settings import A1111_SAMPLERS

    for name in sorted(SAMPLERS):
        doc = (SAMPLERS[name].__doc__ or "").strip().splitlines()[0]
        kind = "stochastic" if name in STOCHASTIC else "deterministic"
        labels = [label for label, ours in A1111_SAMPLERS.items() if ours == name]
        also = f" (also: {', '.join(repr(label) for label in labels)})" if labels else ""
        print(f"{name:<16} {kind:<13} {doc}{also}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out=Path(args.out), steps=args.steps, samples=args.samples, seed=args.seed)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.loop import train

    return _run_training(args, TrainConfig, train, folders=("data", "text_encoder", "autoencoder"))


def _cmd_train_autoencoder(args: argparse.Namespace) -> int:
    from .train.autoencoder import AutoencoderTrainConfig, train_autoencoder

    return _run_training(args, AutoencoderTrainConfig, train_autoencoder, folders=("data",))


def _run_training(args: argparse.Namespace, config_class, train, folders: tuple[str, ...]) -> int:
    """The config from the flags given, over a --config file's values, over the run's saved config.json
    when resuming."""
    given = {name: getattr(args, name) for name in config_class.__dataclass_fields__ if hasattr(args, name)}
    if args.config:
        given = {**config_class.read_file(args.config), **given}  # the flags given win
    for name in folders:  # folders: the run's config names them wherever --resume runs from
        if given.get(name) and Path(given[name]).expanduser().is_dir():
            given[name] = str(Path(given[name]).expanduser().resolve())
    saved = Path(given.get("out", config_class.out)) / "config.json"
    if args.resume and saved.is_file():  # continue with the run's own settings, overridden by the flags given
        config = config_class.from_dict({**config_class.load(saved).__dict__, **given})
    else:
        config = config_class(**given)
    train(config, resume=args.resume)
    return 0


def _settings(args: argparse.Namespace):
    """The sampling flags every image command shares, as checked ImageSettings of the first image: a
    mistake is named before the model loads."""
    import secrets

    from .settings import DEFAULT_GUIDANCE, ImageSettings, sampler_name

    _check_counts(args)
    return ImageSettings(
        args.prompt or "",
        negative_prompt=args.negative,
        sampler=sampler_name(args.sampler),  # ours or AUTOMATIC1111's label ("Euler a")
        sampler_options=_sampler_options(args.sampler_option),
        schedule=getattr(args, "schedule", "Automatic"),
        steps=args.steps,
        guidance=DEFAULT_GUIDANCE if args.guidance is None else args.guidance,  # None: the model's, later
        seed=secrets.randbelow(2**31) if args.seed is None else args.seed,  # image i: seed + i
        denoising_strength=getattr(args, "strength", None),  # edit and inpaint
        repaint_jump=getattr(args, "jump", None),
        repaint_resample=getattr(args, "resample", None),
        variation_seed=getattr(args, "variation_seed", None),  # generate
        variation_strength=getattr(args, "variation_strength", 0.0),
        mix_prompt=getattr(args, "mix_prompt", None) or "",
        prompt_mix=getattr(args, "prompt_mix", 0.0),
        bind_attributes=bool(getattr(args, "bind_attributes", False)),  # None (the model's) checks as off
    ).check()


def _check_counts(args: argparse.Namespace) -> None:
    """-n, --frames, --width and --height, named before the model loads (the size's stride needs it)."""
    from .errors import UnnoiseError
    from .settings import MAX_IMAGES

    if not 1 <= getattr(args, "n", 1) <= MAX_IMAGES:
        raise UnnoiseError(f"-n must be in 1..{MAX_IMAGES}, got {args.n}")
    if not 2 <= getattr(args, "frames", 2) <= MAX_IMAGES:
        raise UnnoiseError(f"--frames must be in 2..{MAX_IMAGES}, got {args.frames}")
    for side in ("width", "height"):
        value = getattr(args, side, None)
        if value is not None and value < 1:
            raise UnnoiseError(f"--{side} must be at least 1 pixel, got {value}")


def _load(args: argparse.Namespace, model: str):
    """The model, once the output folder is known to be usable (a mistake there costs no loading)."""
    from .lora import parse_lora_argument
    from .pipeline import load

    _output_folder(args.out)
    pipe = load(model, device=args.device, **model_loading_options(args))
    for text in getattr(args, "lora", []):
        pipe.add_lora(*parse_lora_argument(text))
    return pipe


def _output_folder(out: str) -> Path:
    """--out as a folder we can write to, made if missing; a file or an unwritable place is an error."""
    from .errors import UnnoiseError

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UnnoiseError(f"{out} is a file; a folder for the PNGs is needed there")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UnnoiseError(f"{out}: cannot make the folder ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise UnnoiseError(f"{out}: the folder is not writable")
    return folder


NUMBERED = re.compile(r"(\d{5,})-")  # AUTOMATIC1111's running counter: 00000-1.png, 00001-2.png, ...


def next_number(folder: Path) -> int:
    """One past the highest running number among the folder's files (0 in a folder without any)."""
    numbers = (NUMBERED.match(p.name) for p in folder.iterdir())
    return 1 + max((int(m.group(1)) for m in numbers if m), default=-1)


def numbered_path(folder: Path, stem: str) -> Path:
    """folder/NNNNN-stem.png with the next running number, as AUTOMATIC1111 names its outputs. The name is
    claimed by creating the file, so an earlier image is never overwritten, not even by a concurrent run."""
    number = next_number(folder)
    while True:
        path = folder / f"{number:05d}-{stem}.png"
        try:
            path.open("xb").close()
            return path
        except FileExistsError:
            number += 1


def _sampler_options(pairs: list[str]) -> dict[str, float]:
    """--sampler-option NAME=VALUE, repeated: {"eta": 0.5, ...} (checked against the sampler later)."""
    from .errors import UnnoiseError

    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            options[name.strip()] = float(value)
        except ValueError:
            raise UnnoiseError(f"--sampler-option wants NAME=NUMBER (e.g. eta=0.5), got {pair!r}") from None
    return options


def _with_progress(total: int, make):
    """Run make(callback) under a progress bar of `total` steps."""
    from tqdm import tqdm

    with tqdm(total=total, unit="step", leave=False) as bar:
        return make(lambda step: bar.update(1))


def _save(images, out: str, stems: list[str]) -> int:
    """Each image as NNNNN-stem.png (the running number goes on across runs), and a grid of them."""
    from .images import contact_sheet

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for image, stem in zip(images, stems, strict=True):
        print(_save_numbered(image, folder, stem))
    if len(images) > 1:
        scale = max(1, 128 // images[0].width)
        sheet = contact_sheet(images, scale=scale, columns=min(8, len(images)))
        print(_save_numbered(sheet, folder, "grid"))
    return 0


def _save_numbered(image, folder: Path, stem: str) -> Path:
    from .images import save_png

    path = numbered_path(folder, stem)
    try:
        return save_png(image, path)
    except BaseException:
        path.unlink(missing_ok=True)  # the empty file that claimed the name must not pass for an image
        raise


def _cmd_generate(args: argparse.Namespace) -> int:
    from .errors import UnnoiseError

    if args.from_png:
        return _generate_from_png(args)
    if args.prompt is None:
        raise UnnoiseError("give a PROMPT, or --from-png FILE")
    s = _settings(args)
    pipe = _load(args, args.model or "shapes-32")
    width, height = _size_said(pipe, args.width, args.height)
    images = _with_progress(
        args.steps,
        lambda callback: pipe.generate(
            s.prompt,
            negative_prompt=s.negative_prompt,
            sampler=s.sampler,
            sampler_options=s.sampler_options,
            steps=s.steps,
            guidance=args.guidance,
            seed=s.seed,
            num_images=args.n,
            width=width,
            height=height,
            variation_seed=args.variation_seed,
            variation_strength=args.variation_strength,
            mix_prompt=args.mix_prompt,
            prompt_mix=args.prompt_mix,
            schedule=s.schedule,
            bind_attributes=args.bind_attributes,
            callback=callback,
        ),
    )
    return _save(images, args.out, [str(s.seed + i) for i in range(len(images))])


def _size_said(pipe, width: int | None, height: int | None) -> tuple[int, int]:
    """The size the model will draw for the one asked, said on stderr when it differs."""
    made = pipe.size_for(width, height)
    if (width or made[0], height or made[1]) != made:
        print(
            f"unnoise: {made[0]}x{made[1]}, not {width}x{height}: at most {pipe.size_note()}", file=sys.stderr
        )
    return made


def _generate_from_png(args: argparse.Namespace) -> int:
    """The image a PNG's parameters describe, again (its model, unless --model names another); what an
    AUTOMATIC1111 PNG describes beyond that (a hires fix, clip skip, ...) is named on stderr."""
    from .errors import UnnoiseError
    from .images import read_png_text
    from .settings import ImageSettings, not_recreated

    text = read_png_text(args.from_png)
    settings = ImageSettings.from_parameters(text)
    if settings.denoising_strength is not None:
        raise UnnoiseError(
            f"{args.from_png} is an edit (img2img or inpainting) of an input image the PNG does not hold;"
            " run `unnoise edit` or `unnoise inpaint` with that image instead"
        )
    pipe = _load(args, args.model or _shipped_model_named(args.from_png, settings.model or "shapes-32"))
    for part in not_recreated(text):
        print(f"unnoise: not re-created from {args.from_png}: {part}", file=sys.stderr)
    width, height = _size_said(pipe, settings.width, settings.height)
    settings = settings.replace(width=width, height=height, model=pipe.name, model_hash=pipe.model_hash)
    images = _with_progress(settings.steps, lambda callback: pipe.render(settings, callback=callback))
    return _save(images, args.out, [str(settings.seed)])


def _shipped_model_named(png: str, named: str) -> Path:
    """The shipped model a PNG's `Model:` names. A PNG is a file someone handed us: a path or any other
    model it names is never loaded from it; --model chooses one."""
    from .errors import UnnoiseError
    from .release import shipped_models

    shipped = {p.name: p for p in shipped_models()}
    if named not in shipped:
        raise UnnoiseError(
            f"{png} was made with the model {named!r}, which is not a shipped model"
            f" ({', '.join(shipped) or 'none'}); name the model to use with --model"
        )
    return shipped[named]


def _cmd_edit(args: argparse.Namespace) -> int:
    from .images import open_image

    s = _settings(args)
    image = open_image(args.image)  # an unreadable image is named before the model loads
    pipe = _load(args, args.model or "shapes-32")
    images = _with_progress(
        round(s.steps * s.denoising_strength),
        lambda callback: pipe.edit(
            image,
            s.prompt,
            strength=args.strength,
            resize_back=not args.model_size,
            negative_prompt=s.negative_prompt,
            sampler=s.sampler,
            sampler_options=s.sampler_options,
            steps=s.steps,
            guidance=args.guidance,
            seed=s.seed,
            num_images=args.n,
            bind_attributes=args.bind_attributes,
            callback=callback,
        ),
    )
    return _save(images, args.out, [f"edit-{s.seed + i}" for i in range(len(images))])


def _cmd_inpaint(args: argparse.Namespace) -> int:
    from .images import open_image, open_mask
    from .settings import REPAINT_JUMP, REPAINT_RESAMPLE

    s = _settings(args)
    image, mask = open_image(args.image), open_mask(args.mask)  # named before the model loads
    pipe = _load(args, args.model or "shapes-32")
    images = _with_progress(
        round(s.steps * s.denoising_strength) * (s.repaint_resample or REPAINT_RESAMPLE),
        lambda callback: pipe.inpaint(
            image,
            mask,
            s.prompt,
            strength=args.strength,
            feather=args.feather,
            area=args.area,
            padding=args.padding,
            jump=REPAINT_JUMP if args.jump is None else args.jump,
            resample=REPAINT_RESAMPLE if args.resample is None else args.resample,
            masked_content=args.masked_content,
            negative_prompt=s.negative_prompt,
            sampler=s.sampler,
            sampler_options=s.sampler_options,
            steps=s.steps,
            guidance=args.guidance,
            seed=s.seed,
            num_images=args.n,
            bind_attributes=args.bind_attributes,
            callback=callback,
        ),
    )
    return _save(images, args.out, [f"inpaint-{s.seed + i}" for i in range(len(images))])


def _cmd_interpolate(args: argparse.Namespace) -> int:
    s = _settings(args)
    pipe = _load(args, args.model or "shapes-32")

    def strip(callback):
        return pipe.interpolate(
            s.prompt, to_prompt=args.to_prompt, seed=s.seed, to_seed=args.to_seed, frames=args.frames,
            negative_prompt=s.negative_prompt, sampler=s.sampler, sampler_options=s.sampler_options,
            steps=s.steps, guidance=args.guidance, callback=callback,
        )  # fmt: skip

    frames = _with_progress(args.steps, strip)  # the frames are one batch: one pass of the sampler
    return _save(frames, args.out, [f"frame-{k:02d}" for k in range(len(frames))])


def _write_report(report: dict, where: str) -> int:
    """The JSON report, written to a temporary name and renamed (never half a file)."""
    import json

    path = Path(where)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


def _cmd_eval_shapes(args: argparse.Namespace) -> int:
    from .eval.shapes_eval import run_shapes_eval
    from .settings import sampler_name

    sampler = sampler_name(args.sampler)  # ours or AUTOMATIC1111's label, named before the model loads
    if args.save_images:
        _output_folder(args.save_images)  # a folder that cannot be made is named before any image is drawn
    images = 4 * args.prompts_per_category * args.samples
    print(  # under torchrun each process says it once: the report is gathered on rank 0
        f"ShapesEval: {images} images of {args.steps} steps (minutes on a CPU); the report goes to"
        f" {Path(args.report).resolve()}"
    )
    report = run_shapes_eval(
        args.model,
        samples_per_prompt=args.samples,
        sampler=sampler,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        prompts_per_category=args.prompts_per_category,
        device=args.device,
        save_images=args.save_images,
        bind_attributes=args.bind_attributes,
        progress=True,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 writes the one gathered report
        return 0
    print(report.table())
    return _write_report(report.to_dict(), args.report)


def _cmd_eval_folder(args: argparse.Namespace) -> int:
    from .eval.folder_eval import run_folder_eval
    from .settings import sampler_name

    sampler = sampler_name(args.sampler)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unnoise" / "judges"
    report = run_folder_eval(
        args.model, args.data, held_out=args.held_out, captions=args.captions, sampler=sampler,
        steps=args.steps, guidance=args.guidance, seed=args.seed, device=args.device,
        judge_steps=args.judge_steps, judge_cache=cache,
    )  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: every process holds the report; one writes
        return 0
    for side in ("train", "held_out"):
        r = report[side]
        align = r["text_alignment"]
        print(
            f"{side}: {r['captions']} captions; text alignment {align['fraction']:.2f} of the way from"
            f" shuffled captions ({align['floor']:.3f}) to real images ({align['ceiling']:.3f});"
            f" FD {r['fd']:.3f}, KID {r['kid']:.4f}, precision {r['precision']:.2f}, recall"
            f" {r['recall']:.2f}, density {r['density']:.2f}, coverage {r['coverage']:.2f},"
            f" near copies {r['near_copies']:.0%}"
        )
    if "autoencoder" in report:
        r = report["autoencoder"]
        print(
            f"autoencoder: {r['images']} held-out images reconstructed at PSNR {r['psnr']:.2f} dB, SSIM"
            f" {r['ssim']:.3f}, FD {r['fd']:.3f} (the originals blurred: {r['fd_blurred_control']:.3f})"
        )
    return _write_report(report, args.report)


def _cmd_eval_inpaint(args: argparse.Namespace) -> int:
    from .eval.inpaint_eval import run_inpaint_eval, table
    from .settings import sampler_name

    sampler = sampler_name(args.sampler)  # ours or AUTOMATIC1111's label, named before the model loads
    if args.save_images:
        _output_folder(args.save_images)  # a folder that cannot be made is named before any image is drawn
    report = run_inpaint_eval(
        args.model,
        samples=args.samples,
        sampler=sampler,
        steps=args.steps,
        guidance=args.guidance,
        area=args.area,
        seed=args.seed,
        device=args.device,
        jump=args.jump,
        resample=args.resample,
        save_images=args.save_images,
        progress=True,
    )
    print(table(report))
    return _write_report(report, args.report)


def _cmd_defaults(args: argparse.Namespace) -> int:
    """Show a release's sampling defaults; with --guidance, --[no-]bind-attributes or --reset set them
    first, in config.json."""
    from .errors import UnnoiseError
    from .release import (
        RELEASE_DEFAULTS,
        check_release_config,
        is_guidance,
        read_release_config,
        release_bind_attributes,
        release_guidance,
        resolve_model,
        set_release_defaults,
    )
    from .settings import MAX_GUIDANCE

    folder = resolve_model(args.model)
    if args.guidance is not None and not is_guidance(args.guidance):
        raise UnnoiseError(f"--guidance must be in 0..{MAX_GUIDANCE:g}, got {args.guidance}")
    changes = {name: getattr(args, name) for name in RELEASE_DEFAULTS if getattr(args, name) is not None}
    if args.reset and changes:
        raise UnnoiseError("--reset removes the release's own defaults; give it alone")
    if args.reset:
        changes = dict.fromkeys(RELEASE_DEFAULTS)  # None removes each
    if changes:
        config = set_release_defaults(folder, **changes)
    else:
        config = read_release_config(folder)
        check_release_config(folder, config)
    own = config.get("defaults", {})

    def source(name: str) -> str:
        return "the release's own" if name in own else "unnoise's default: the release names none"

    print(f"{folder}: guidance {release_guidance(config):g} ({source('guidance')})")
    binds = "on" if release_bind_attributes(config) else "off"
    print(f"{folder}: attribute binding {binds} ({source('bind_attributes')})")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server.app import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        queue_size=args.queue_size,
        allowed_hosts=tuple(args.allow_host),
        device=args.device,
        deadline=args.deadline,
        models_dirs=tuple(args.models_dir),
        auto_threads=args.threads == "auto",
        log_level=args.log_level,
        lora_dir=args.lora_dir,
        load_options=model_loading_options(args),
    )
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
        help_text = field.metadata.get("help", "")
        said = "(default:" in help_text or default is None  # a None default is explained in the help
        help_text = help_text if said else f"{help_text} (default: {default})".lstrip()
        shown = {"default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), **shown)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **shown)
        elif default is None:  # `int | None`, `float | None`: the type that is not None
            kind = next(t for t in typing.get_args(hint) if t is not type(None))
            parser.add_argument(flag, type=kind, **shown)
        else:
            parser.add_argument(flag, type=type(default), **shown)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """--resume and --config, the flags of every training command beside its options."""
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last good checkpoint"
    )
    p.add_argument(
        "--config",
        default=None,
        help="a TOML or JSON file of options (their names, with _ or -); the flags given override it",
    )


def add_repaint_arguments(p: argparse.ArgumentParser) -> None:
    """--jump and --resample; left out, they take the pipeline's defaults (REPAINT_JUMP, REPAINT_RESAMPLE)."""
    p.add_argument("--jump", type=int, default=None, help="RePaint: steps per resampled block (default 2)")
    p.add_argument(
        "--resample", type=int, default=None, help="RePaint: runs of each block (default 5; 1 = off)"
    )


def add_sampling_arguments(p: argparse.ArgumentParser, *, count: bool = True) -> None:
    from .settings import DEFAULT_SAMPLER, DEFAULT_STEPS

    if count:
        p.add_argument("-n", type=int, default=1, help="number of images; image i uses seed + i (default 1)")
    p.add_argument("--seed", type=int, default=None, help="default: random")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"(default {DEFAULT_STEPS})")
    p.add_argument(
        "--sampler", default=DEFAULT_SAMPLER, help=f"see `unnoise samplers` (default {DEFAULT_SAMPLER})"
    )
    p.add_argument(
        "--sampler-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a sampler's option, e.g. eta=0.5 for ddim (repeat for more; `unnoise samplers` lists them)",
    )
    p.add_argument(
        "--schedule",
        default="Automatic",
        help="AUTOMATIC1111's schedule type: Automatic (the model's choice for the sampler), Karras,"
        " Exponential or Uniform (the last two for Stable Diffusion models)",
    )
    add_guidance_argument(p)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument(
        "--model", default=None, help="a shipped model's name, a release folder or a diffusers SD folder"
    )
    add_model_loading_arguments(p)
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="Stable Diffusion models: a LoRA .safetensors file (kohya-ss or diffusers layout) at SCALE"
        " (default 1); repeat for more",
    )
    add_device_argument(p)
    p.add_argument(
        "--out",
        default="out",
        help="folder for the PNGs (default ./out); earlier images are never overwritten",
    )
    p.set_defaults(n=1)


def add_model_loading_arguments(p: argparse.ArgumentParser) -> None:
    """How a Stable Diffusion model is loaded: its convention, clip skip and, for single files, config."""
    p.add_argument(
        "--convention",
        default="a1111",
        choices=("a1111", "comfyui", "diffusers"),
        help="Stable Diffusion models: sample as AUTOMATIC1111, ComfyUI or diffusers do, so a seed gives"
        " their image (docs/stable-diffusion.md; default a1111)",
    )
    p.add_argument(
        "--clip-skip", type=int, default=1, help="Stable Diffusion models: A1111's clip skip (default 1)"
    )
    p.add_argument(
        "--prediction-type",
        choices=("epsilon", "v"),
        default=None,
        help="a single-file SD 2.x checkpoint: what it predicts (SD 2 base: epsilon; SD 2 768-v: v)",
    )
    p.add_argument(
        "--config-from",
        default=None,
        help="a single-file checkpoint: a local diffusers folder of the same family to take its config and"
        " tokenizer from (default: unnoise's own for SD 1.x and 2.x)",
    )
    p.add_argument(
        "--precision",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="Stable Diffusion models: the UNet's and text encoder's precision (the VAE stays float32)",
    )


def model_loading_options(args: argparse.Namespace) -> dict:
    """`unnoise.load`'s keywords from the flags of `add_model_loading_arguments`."""
    return {
        "convention": getattr(args, "convention", "a1111"), "clip_skip": getattr(args, "clip_skip", 1),
        "precision": getattr(args, "precision", "float32"),
        "prediction_type": getattr(args, "prediction_type", None),
        "config_from": getattr(args, "config_from", None),
    }  # fmt: skip


def add_binding_argument(p: argparse.ArgumentParser) -> None:
    """--bind-attributes / --no-bind-attributes; left out, the model's own default (`unnoise defaults`)."""
    p.add_argument(
        "--bind-attributes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bind each noun's cross-attention to its attributes' ('a red circle and a blue square': the"
        " pixels that read 'red' read 'circle'); written in the PNG (default: the model's, see `unnoise"
        " defaults`; off for a model that names none; docs/generation.md)",
    )


def add_guidance_argument(p: argparse.ArgumentParser) -> None:
    """--guidance; left out, the model's own default (`unnoise defaults MODEL` shows it)."""
    from .settings import DEFAULT_GUIDANCE

    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; 1 = none (default: the model's, see `unnoise defaults`;"
        f" {DEFAULT_GUIDANCE:g} for a model that names none)",
    )


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps (default auto)",
    )
    p.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="CPU threads for the model (default: one per core; serve: auto); fewer when other work shares"
        " the cores, since PyTorch's threads slow down many times over rather than share; 'auto': one per"
        " core that other processes leave free (measured before each job when serving)",
    )


def thread_count(text: str) -> int | str:
    """--threads N or --threads auto (N is checked by use_threads, so the message names the flag)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of threads or 'auto', not {text!r}") from None


def use_threads(threads: int | str | None) -> None:
    """--threads: PyTorch's CPU thread count for this process (None: its default, one per core; "auto": the
    cores other processes leave free now)."""
    from .errors import UnnoiseError

    if threads is None:
        return
    most = 4 * (os.cpu_count() or 1)  # more threads than that only contend; OpenMP crashes on 100,000
    if threads != "auto" and not 1 <= threads <= most:
        raise UnnoiseError(f"--threads must be in 1..{most} (4 per CPU of this machine), got {threads}")
    import torch

    from .threads import CpuShare

    torch.set_num_threads(CpuShare().threads() if threads == "auto" else threads)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .settings import DEFAULT_SAMPLER, DEFAULT_STEPS, MASKED_CONTENTS

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
    add_sampling_arguments(p)
    add_binding_argument(p)
    p.add_argument(
        "--width", type=int, default=None, help="default: the model's size (see docs/generation.md)"
    )
    p.add_argument("--height", type=int, default=None, help="default: the model's size")
    p.add_argument("--variation-seed", type=int, default=None, help="move each image towards this seed's")
    p.add_argument("--variation-strength", type=float, default=0.0, help="how far, 0..1 (default 0)")
    p.add_argument("--mix-prompt", default="", help="move the text condition towards this prompt's")
    p.add_argument("--prompt-mix", type=float, default=0.0, help="how far, 0..1 (default 0)")
    p.add_argument("--from-png", default=None, help="re-create an image from the parameters in its PNG")
    p.set_defaults(run=_cmd_generate)

    p = sub.add_parser("edit", help="img2img: redraw an image towards a prompt (SDEdit)")
    p.add_argument("image", help="the input image (any size and mode; resized to the model's size)")
    p.add_argument("prompt", help="what the result should show")
    p.add_argument(
        "--strength", type=float, default=0.6, help="0 keeps the image, 1 ignores it (default 0.6)"
    )
    p.add_argument("--model-size", action="store_true", help="keep the result at the model's size")
    add_sampling_arguments(p)
    add_binding_argument(p)
    p.set_defaults(run=_cmd_edit)

    p = sub.add_parser(
        "inpaint", help="regenerate the white part of a mask; every other pixel is kept exactly"
    )
    p.add_argument("image", help="the input image (any size and mode)")
    p.add_argument("mask", help="a mask of the same size: white = regenerate, black = keep")
    p.add_argument("prompt", help="what the regenerated part should show")
    p.add_argument("--strength", type=float, default=1.0, help="1 regenerates from noise (default 1)")
    p.add_argument("--feather", type=int, default=0, help="blur the mask's edge by this many pixels")
    p.add_argument(
        "--area", choices=("whole", "masked"), default="whole", help="what the model sees (default whole)"
    )
    p.add_argument("--padding", type=int, default=4, help="context pixels around the mask for --area masked")
    p.add_argument(
        "--masked-content",
        choices=MASKED_CONTENTS,
        default="original",
        help="below --strength 1, what the white part starts from: the input (default), its surroundings"
        " spread in (fill), noise, or flat grey (nothing); AUTOMATIC1111's 'Masked content'",
    )
    add_repaint_arguments(p)
    add_sampling_arguments(p)
    add_binding_argument(p)
    p.set_defaults(run=_cmd_inpaint)

    p = sub.add_parser("interpolate", help="a strip of images between two seeds and/or two prompts")
    p.add_argument("prompt", help="the first frame's prompt")
    p.add_argument("--to-prompt", default=None, help="the last frame's prompt (default: the same)")
    p.add_argument("--to-seed", type=int, default=None, help="the last frame's seed (default: the same)")
    p.add_argument("--frames", type=int, default=8, help="number of frames (default 8)")
    add_sampling_arguments(p, count=False)
    p.set_defaults(run=_cmd_interpolate)

    p = sub.add_parser("eval", help="evaluate a model")
    suites = p.add_subparsers(dest="suite", required=True)
    p = suites.add_parser(
        "shapes", help="ShapesEval: exact prompt alignment on the shapes grammar, no judge model"
    )
    p.add_argument("--model", default="shapes-32", help="a shipped model's name or a release folder")
    add_device_argument(p)
    p.add_argument("--samples", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    add_guidance_argument(p)
    add_binding_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prompts-per-category",
        type=int,
        default=24,
        help="the first K prompts of each category, for a quick look (default: all 24)",
    )
    p.add_argument("--report", default="shapes_eval.json", help="where the JSON report goes")
    p.add_argument(
        "--save-images", default=None, metavar="FOLDER", help="save every image, named by prompt and verdict"
    )
    p.set_defaults(run=_cmd_eval_shapes)
    p = suites.add_parser(
        "inpaint", help="InpaintEval: recolour or reshape a masked object; judged by ShapesEval's checker"
    )
    p.add_argument("--model", default="shapes-32", help="a shipped model's name or a release folder")
    add_device_argument(p)
    p.add_argument("--samples", type=int, default=2, help="images per trial, 36 trials (default 2)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    add_guidance_argument(p)
    add_repaint_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--area", choices=("whole", "masked"), default="whole", help="what the model sees")
    p.add_argument("--report", default="inpaint_eval.json", help="where the JSON report goes")
    p.add_argument(
        "--save-images",
        default=None,
        metavar="FOLDER",
        help="save every inpainted image there, as colour|shape/<trial>-<seed>-<pass|fail>.png",
    )
    p.set_defaults(run=_cmd_eval_inpaint)

    p = suites.add_parser(
        "folder",
        help="judge a model on a folder of captioned images: text alignment against controls, FD, KID,"
        " precision/recall, density/coverage, near copies, on a concept split (docs/evaluation.md)",
    )
    p.add_argument("--model", required=True, help="a shipped model's name or a release folder")
    p.add_argument("--data", required=True, help="the folder of captioned images the model is judged on")
    p.add_argument(
        "--held-out", type=float, default=0.1, help="the split's held-out fraction of concepts (default 0.1)"
    )
    p.add_argument("--captions", type=int, default=300, help="captions drawn per side (default 300)")
    add_device_argument(p)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    add_guidance_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-steps", type=int, default=1500, help="training steps of the judge (default 1500)")
    p.add_argument("--report", default="folder_eval.json", help="where the JSON report goes")
    p.set_defaults(run=_cmd_eval_folder)

    p = sub.add_parser(
        "defaults",
        help="show or set the sampling defaults a released model carries (used when none is given)",
        description="A release may carry the guidance its maker measured best, and whether it binds"
        " attributes, in its config.json; generate, edit, inpaint, interpolate, eval and serve use them when"
        " a request gives none.",
    )
    p.add_argument("model", help="a shipped model's name or a release folder")
    p.add_argument("--guidance", type=float, default=None, help="set the release's default guidance")
    p.add_argument(
        "--bind-attributes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="set whether the release binds attributes by default (docs/generation.md)",
    )
    p.add_argument("--reset", action="store_true", help="remove the release's own defaults")
    p.set_defaults(run=_cmd_defaults)

    p = sub.add_parser(
        "serve", help="serve a model over HTTP: a web page, AUTOMATIC1111 and OpenAI APIs, jobs"
    )
    p.add_argument(
        "--model",
        default="shapes-32",
        help="a shipped model's name, a release folder, a diffusers SD folder or a .safetensors checkpoint",
    )
    add_device_argument(p)
    add_model_loading_arguments(p)
    p.set_defaults(threads="auto")  # a server runs for long, beside whatever else the machine does
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port", type=int, default=7860, help="the TCP port to listen on (default 7860, as A1111)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("UNNOISE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (needed off loopback); better: set UNNOISE_API_KEY,"
        " which `ps` does not show",
    )
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more get HTTP 429")
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        default="info",
        help="info: a line per request; warning: only 4xx and 5xx answers and faults (default info)",
    )
    p.add_argument(
        "--deadline",
        type=float,
        default=300.0,
        help="seconds a request may take, queue included; later it is a 503 with Retry-After (default 300)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        help="a DNS name clients may call this server by (repeatable)",
    )
    p.add_argument(
        "--models-dir",
        action="append",
        default=[],
        help="a folder of released models (or of training runs) clients may switch to, besides the shipped"
        " ones (repeatable)",
    )
    p.add_argument(
        "--lora-dir",
        default=None,
        help="a folder of LoRA .safetensors files that prompts name as <lora:NAME:WEIGHT> (AUTOMATIC1111's"
        " syntax; Stable Diffusion models; only files directly inside it)",
    )
    p.set_defaults(run=_cmd_serve)

    from .train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a text-to-image model on the built-in shapes or a folder of captioned images",
        description="Train a text-conditioned diffusion model. Works on a CPU; under"
        " `torchrun --nproc_per_node N` it trains with DistributedDataParallel."
        " Kill it at any time and rerun with --resume.",
    )
    add_config_arguments(p, TrainConfig)
    add_run_arguments(p)
    p.set_defaults(run=_cmd_train)

    from .train.autoencoder import AutoencoderTrainConfig

    p = sub.add_parser(
        "train-autoencoder",
        help="train the image codec of a latent model on a folder of images",
        description="Train a small convolutional autoencoder (pixels <-> latents) on a folder; its release"
        " (model/) is what `unnoise train --autoencoder` trains a latent model on. Kill it at any time and"
        " rerun with --resume.",
    )
    add_config_arguments(p, AutoencoderTrainConfig)
    add_run_arguments(p)
    p.set_defaults(run=_cmd_train_autoencoder)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import UnnoiseError

    try:
        use_threads(getattr(args, "threads", None))
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
