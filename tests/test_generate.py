"""Generation from a released model: seeds per image, PNG parameters that re-create the image, guidance."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unnoise
from unnoise.diffusion.guidance import cfg
from unnoise.errors import UnnoiseError
from unnoise.images import read_png_parameters, save_png, with_info
from unnoise.settings import ImageSettings
from unnoise.train.config import TrainConfig
from unnoise.train.loop import train

from .conftest import run_cli


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(
        TrainConfig(preset="tiny", batch_size=4, steps=2, checkpoint_every=2, sample_every=0, out=str(out))
    )


def pixels(image):
    return np.asarray(image)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_a_seed_gives_the_same_image_whatever_the_number_of_images(model, sampler):
    pipe = unnoise.load(model)
    four = pipe.generate("a red circle", seed=10, num_images=4, steps=6, sampler=sampler)
    one = pipe.generate("a red circle", seed=12, num_images=1, steps=6, sampler=sampler)
    assert len(four) == 4 and four[0].size == (16, 16)
    np.testing.assert_array_equal(pixels(four[2]), pixels(one[0]))
    assert not np.array_equal(pixels(four[0]), pixels(four[1]))


def test_png_parameters_round_trip_and_recreate_the_image(model, tmp_path):
    pipe = unnoise.load(model)
    image = pipe.generate("a blue square", negative_prompt="red", seed=3, steps=5, guidance=2.5)[0]
    path = save_png(image, tmp_path / "a.png")
    request = read_png_parameters(path)
    run_name = Path(model).parent.name  # a training run's model/ is named after its run
    expected = ImageSettings(
        "a blue square",
        "red",
        "dpmpp_2m",
        steps=5,
        guidance=2.5,
        seed=3,
        width=16,
        height=16,
        model=run_name,
        schedule="Karras",  # what Automatic is for unnoise's own models, written as it ran
    )
    assert request == expected.replace(model_hash=pipe.model_hash) and len(pipe.model_hash) == 10
    assert "Negative prompt: red" in image.info["parameters"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "unnoise",
            "generate",
            "--from-png",
            str(path),
            "--model",
            str(model),
            "--out",
            str(tmp_path / "again"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    from PIL import Image

    np.testing.assert_array_equal(pixels(Image.open(tmp_path / "again" / "00000-3.png")), pixels(image))


def test_from_png_never_loads_a_model_from_a_path_the_png_names(model, tmp_path):
    """Issue 12: `--from-png` took the model path from the PNG it was given (a file from anyone)."""
    pipe = unnoise.load(model)
    image = pipe.generate("a blue square", seed=3, steps=2)[0]
    settings = ImageSettings.from_parameters(image.info["parameters"]).replace(
        model=str(Path(model).resolve())
    )
    path = save_png(with_info(image, {"parameters": settings.parameters()}), tmp_path / "a.png")
    refused = run_cli("generate", "--from-png", str(path), "--out", str(tmp_path / "o"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "not a shipped model" in refused.stderr and "--model" in refused.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was loaded or written
    chosen = run_cli("generate", "--from-png", str(path), "--model", str(model), "--out", str(tmp_path / "o"))
    assert chosen.returncode == 0, chosen.stderr


A1111_TEXT = (
    "a red circle\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7,"
    " Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7,"
    " Clip skip: 2, Hires upscale: 2, Hires upscaler: Latent, Version: v1.9.3"
)


def a1111_png(path: Path, text: str) -> Path:
    """A PNG as AUTOMATIC1111 writes it: any pixels, its settings in the `parameters` text chunk."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), "gray").save(path, pnginfo=info)
    return path


def test_from_png_recreates_an_automatic1111_png_and_names_what_it_cannot(model, tmp_path):
    """Issue 13: `--from-png` failed on a real AUTOMATIC1111 PNG; a hires-fix PNG was refused as an edit."""
    png = a1111_png(tmp_path / "a1111.png", A1111_TEXT)
    refused = run_cli("generate", "--from-png", str(png), "--out", str(tmp_path / "o"))
    assert refused.returncode == 2 and "'v1-5-pruned-emaonly', which is not a shipped model" in refused.stderr
    run = run_cli("generate", "--from-png", str(png), "--model", str(model), "--out", str(tmp_path / "o"))
    assert run.returncode == 0, run.stderr
    assert (
        "not re-created from" in run.stderr
        and "Hires upscale: 2" in run.stderr
        and "Clip skip: 2" in run.stderr
    )
    assert "not 512x512" in run.stderr  # the tiny model draws at most 4x its 16x16 pixels
    made = read_png_parameters(run.stdout.split()[-1])
    assert (made.prompt, made.negative_prompt, made.sampler, made.seed) == (
        "a red circle",
        "blurry",
        "dpmpp_2m",
        1234,
    )
    assert (made.steps, made.guidance, made.denoising_strength) == (3, 7.0, None)
    assert (made.width, made.height) == (32, 32)


def test_from_png_names_an_edit_it_cannot_recreate(tmp_path):
    text = A1111_TEXT.split(", Clip skip")[0]  # img2img: a denoising strength without a hires fix
    run = run_cli(
        "generate", "--from-png", str(a1111_png(tmp_path / "edit.png", text)), "--out", str(tmp_path)
    )
    assert run.returncode == 2 and "is an edit (img2img or inpainting)" in run.stderr, run.stderr


def test_cli_writes_images_and_a_contact_sheet(model, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "unnoise",
            "generate",
            "two green circles",
            "-n",
            "3",
            "--seed",
            "7",
            "--steps",
            "4",
            "--model",
            str(model),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00000-7.png",
        "00001-8.png",
        "00002-9.png",
        "00003-grid.png",
    ]


def test_bad_input_is_named(model, tmp_path):
    pipe = unnoise.load(model)
    with pytest.raises(UnnoiseError, match="unknown sampler"):
        pipe.generate("x", sampler="nope")
    with pytest.raises(UnnoiseError, match="steps must be"):
        pipe.generate("x", steps=0)
    with pytest.raises(UnnoiseError, match="no model 'missing'"):
        unnoise.load("missing")
    (tmp_path / "plain.png").write_bytes((model / "config.json").read_bytes())
    with pytest.raises(UnnoiseError, match="cannot read"):
        read_png_parameters(tmp_path / "plain.png")


def test_guidance_scale_1_is_the_conditional_denoiser_and_0_the_unconditional():
    def denoiser(x, sigma, cond):
        return x * cond

    x, sigma = torch.randn(2, 3), torch.ones(2)
    torch.testing.assert_close(cfg(denoiser, 1.0, uncond=0.5)(x, sigma, 2.0), 2.0 * x)
    torch.testing.assert_close(cfg(denoiser, 0.0, uncond=0.5)(x, sigma, 2.0), 0.5 * x)
    torch.testing.assert_close(cfg(denoiser, 3.0, uncond=0.5)(x, sigma, 2.0), (0.5 + 3.0 * 1.5) * x)


def test_eval_shapes_command_runs_on_a_model(model, tmp_path):
    """Plumbing only: a 2-step model scores near 0; what ShapesEval measures is tested in test_shapes_eval."""
    import json

    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "unnoise",
            "eval",
            "shapes",
            "--model",
            str(model),
            "--samples",
            "1",
            "--steps",
            "2",
            "--report",
            str(report),
            "--prompts-per-category",
            "2",
            "--save-images",
            str(tmp_path / "images"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "counting" in run.stdout
    assert "prompt/s" in run.stderr or "s/prompt" in run.stderr  # issue 13: eval showed no progress
    assert set(json.loads(report.read_text())) >= {"settings"}
    saved = sorted(
        p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*.png")
    )
    assert (
        len(saved) == 8
        and saved[0].startswith("binding/00-0-")
        and saved[0].endswith(("pass.png", "fail.png"))
    )
    assert read_png_parameters(tmp_path / "images" / saved[0]).steps == 2


def test_eval_inpaint_shows_its_progress(model, tmp_path):
    report = str(tmp_path / "inpaint.json")
    run = run_cli("eval", "inpaint", "--model", str(model), "--samples", "1", "--steps", "1",
                  "--resample", "1", "--report", report, "--save-images", str(tmp_path / "seen"))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "trial/s" in run.stderr or "s/trial" in run.stderr
    saved = sorted(p.relative_to(tmp_path / "seen").as_posix() for p in (tmp_path / "seen").rglob("*.png"))
    assert len(saved) == 36 and saved[0].startswith("colour/00-0-") and saved[-1].startswith("shape/")
    assert read_png_parameters(tmp_path / "seen" / saved[0]).denoising_strength == 1.0


def test_guidance_in_one_batch_equals_two_calls(model):
    """cfg stacks [uncond; cond] into one network call; prompts of different token lengths are padded."""
    pipe = unnoise.load(model)
    cond = pipe.text.encode(["a small red circle in the top left", "three blue squares"])
    uncond = pipe.text.encode(["", "green"])
    x, sigma = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 0.5])
    with torch.no_grad():
        batched = cfg(pipe.denoiser, 2.5, uncond)(x, sigma, cond)
        conditional, unconditional = pipe.denoiser(x, sigma, cond), pipe.denoiser(x, sigma, uncond)
    expected = unconditional + 2.5 * (conditional - unconditional)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)


def test_a_config_that_asks_for_a_huge_network_is_refused_before_any_allocation(tmp_path):
    """Issue 12: a 2 KB config.json next to the shipped weights asked for 386 GiB before they were checked."""
    import json
    import resource
    import shutil

    from unnoise.release import MODELS_DIR

    folder = tmp_path / "hostile"
    shutil.copytree(MODELS_DIR / "shapes-32", folder)
    config = json.loads((folder / "config.json").read_text())
    network = config.get("network") or config.pop("unet")
    config["network"] = {**network, "channels": 4096, "channel_mult": [1, 2, 4, 8]}  # about 25 GB in fp32
    (folder / "config.json").write_text(json.dumps(config))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UnnoiseError, match=r"the weights do not match config\.json"):
        unnoise.load(folder)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing huge made
    for broken in ([1, 2], {"network": {"kind": "mamba"}}, {"network": {"channels": "many"}}):
        (folder / "config.json").write_text(json.dumps(broken))
        with pytest.raises(UnnoiseError):
            unnoise.load(folder)
    # issue 31: shapes the weights cannot catch (a resolution allocates nothing until an image is drawn)
    for field, value in (("resolution", 1_000_000), ("resolution", 20_000), ("head_channels", 0)):
        config["network"] = {**network, field: value}
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(UnnoiseError, match=f"{field} must be whole numbers in"):
            unnoise.load(folder)


def unnoise_cli(*args: str):
    return run_cli(*args)


def test_the_cli_never_overwrites_an_earlier_image(model, tmp_path):
    """Issue 13: a second `generate --seed 1` silently overwrote out/1.png made with another prompt. Now the
    files carry AUTOMATIC1111's running number, which goes on across runs and past foreign files."""
    (tmp_path / "00041-notes.txt").write_text("a file of the user's with a number: the count goes past it")
    first = unnoise_cli("generate", "a red circle", "--seed", "1", "--steps", "2", "--model", str(model),
                        "--out", str(tmp_path))  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [str(tmp_path / "00042-1.png")]
    before = (tmp_path / "00042-1.png").read_bytes()
    second = unnoise_cli("generate", "a blue square", "--seed", "1", "--steps", "2", "--sampler", "Euler a",
                         "--model", str(model), "--out", str(tmp_path))  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "00042-1.png").read_bytes() == before
    again = read_png_parameters(tmp_path / "00043-1.png")
    assert again.prompt == "a blue square" and again.sampler == "euler_ancestral"
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_taken_number_is_skipped_not_overwritten(tmp_path):
    """The name is claimed by creating the file: a number another run took meanwhile is passed over."""
    from unnoise.cli import numbered_path

    (tmp_path / "00000-3.png").write_bytes(b"an earlier image")
    first = numbered_path(tmp_path, "3")
    assert first.name == "00001-3.png" and first.exists()  # claimed, so the next call cannot take it
    assert numbered_path(tmp_path, "3").name == "00002-3.png"
    assert (tmp_path / "00000-3.png").read_bytes() == b"an earlier image"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--out", "README.md"], "is a file"),
        (["--sampler", "eulr"], "unknown sampler 'eulr'"),
        (["--sampler-option", "eta=0.5"], "has no option eta"),
        (["--seed", str(2**70)], "seed must be in 0.."),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
        (["--threads", "0"], "--threads must be in 1.."),
        (["--threads", "100000"], "--threads must be in 1.."),  # issue 31: OpenMP segfaulted (exit 139)
        (["-n", "0"], "-n must be in 1..64, got 0"),
        (["--width", "0"], "--width must be at least 1 pixel, got 0"),
        (["--variation-strength", "nan"], "variation strength must be a finite number"),
        (["--prompt-mix", "2"], "prompt mix must be in [0, 1], got 2.0"),
    ],
)
def test_cli_mistakes_are_named_before_the_model_loads(tmp_path, flags, message):
    """Issue 13: `--out README.md` ran every step and then failed; a misspelt sampler failed after loading."""
    (tmp_path / "README.md").write_text("a file")
    flags = [str(tmp_path / f) if f == "README.md" else f for f in flags]
    run = run_cli(
        "generate", "x", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), *flags
    )
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "no model" not in run.stderr  # named before the (missing) model would have been looked for


@pytest.mark.parametrize(
    "command, flags, message",
    [
        ("edit", ["--strength", "nan"], "denoising strength must be a finite number"),
        ("edit", ["--strength", "inf"], "denoising strength must be a finite number"),
        ("edit", ["--strength", "1.5"], "denoising strength must be in [0, 1], got 1.5"),
        ("inpaint", ["--strength", "nan"], "denoising strength must be a finite number"),
        ("inpaint", ["--resample", "0"], "repaint resample must be at least 1, got 0"),
        ("inpaint", ["--jump", "0"], "repaint jump must be at least 1, got 0"),
        ("edit", [], "cannot read the image"),
        ("inpaint", [], "cannot read the image"),
    ],
)
def test_edit_mistakes_are_named_before_the_model_loads(tmp_path, command, flags, message):
    """Issue 12: `edit --strength nan` was a traceback (the progress bar's length was computed from it)."""
    images = ["in.png", "mask.png"] if command == "inpaint" else ["in.png"]
    run = run_cli(
        command, *images, "x", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path), *flags
    )
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert "no model" not in run.stderr  # named before the (missing) model would have been looked for


def test_interpolate_frames_and_eval_samplers_are_named_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no-model")
    run = run_cli(
        "interpolate", "x", "--to-seed", "2", "--frames", "1", "--model", missing, "--out", str(tmp_path)
    )
    assert run.returncode == 2 and "--frames must be in 2..64, got 1" in run.stderr, run.stderr
    run = run_cli("eval", "shapes", "--model", missing, "--sampler", "eulr")
    assert run.returncode == 2 and "unknown sampler 'eulr'" in run.stderr and "no model" not in run.stderr


def test_the_library_and_eval_take_automatic1111s_sampler_labels(model, tmp_path):
    """Issue 13: the CLI and server took "Euler a" but `pipe.generate(sampler="Euler a")` did not."""
    pipe = unnoise.load(model)
    image = pipe.generate("x", sampler="Euler a", steps=2, seed=1)[0]
    assert ImageSettings.from_parameters(image.info["parameters"]).sampler == "euler_ancestral"
    report = str(tmp_path / "r.json")
    run = run_cli("eval", "shapes", "--model", str(model), "--sampler", "Euler a", "--samples", "1",
                  "--steps", "1", "--prompts-per-category", "1", "--report", report)  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_threads_sets_pytorchs_thread_count(model, tmp_path):
    """Issue 12: under a competing process PyTorch's threads slow down many times over; --threads 1 shares."""
    before = torch.get_num_threads()
    try:
        run = run_cli(
            "generate", "x", "--model", str(model), "--steps", "1", "--threads", "1", "--out", str(tmp_path)
        )
        assert run.returncode == 0, run.stderr
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_sizes_other_than_the_models_keep_the_aspect_within_the_pixel_budget(model):
    """Issue 13: width and height other than the model's size (the tiny model: 16x16, stride 2)."""
    pipe = unnoise.load(model)
    assert pipe.size_for(None, None) == (16, 16)
    assert pipe.size_for(24, 16) == (24, 16)  # within 4x the pixels: as asked
    assert pipe.size_for(25, 17) == (24, 16)  # rounded down to the stride
    assert pipe.size_for(512, 512) == (32, 32)  # 4x the pixels at most, aspect kept
    assert pipe.size_for(1024, 256) == (64, 16)
    image = pipe.generate("a red circle", width=24, height=16, steps=3, seed=1)[0]
    assert image.size == (24, 16) and "Size: 24x16" in image.info["parameters"]
    with pytest.raises(UnnoiseError, match="must be positive"):
        pipe.size_for(0, 16)


def test_edit_inpaint_and_interpolate_commands_write_their_images(model, tmp_path):
    """The editing commands, run as a user runs them (the tiny model, 2 steps)."""
    image = tmp_path / "in.png"
    Image.effect_noise((16, 16), 60).convert("RGB").save(image)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (16, 16), 0)
    m.paste(255, (0, 0, 8, 8))
    m.save(mask)
    common = ["--model", str(model), "--steps", "2", "--seed", "3", "--out", str(tmp_path / "out")]
    for args in (
        [
            "edit",
            str(image),
            "a red circle",
            "--strength",
            "0.5",
            "--sampler",
            "ddim",
            "--sampler-option",
            "eta=0.5",
        ],
        ["inpaint", str(image), str(mask), "a blue square", "--resample", "1"],
        ["interpolate", "a red circle", "--to-prompt", "a blue square", "--frames", "3"],
    ):
        run = unnoise_cli(*args, *common)
        assert run.returncode == 0, (args, run.stderr)
        assert "step/s" in run.stderr or "s/step" in run.stderr  # a progress bar (interpolate had none)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "00000-edit-3.png",
        "00001-inpaint-3.png",
        "00002-frame-00.png",
        "00003-frame-01.png",
        "00004-frame-02.png",
        "00005-grid.png",
    ]
    edited = read_png_parameters(tmp_path / "out" / "00000-edit-3.png")
    assert (edited.sampler, edited.sampler_options, edited.denoising_strength) == ("ddim", {"eta": 0.5}, 0.5)
    kept = np.asarray(Image.open(tmp_path / "out" / "00001-inpaint-3.png").convert("RGB"))
    assert np.array_equal(kept[8:, 8:], np.asarray(Image.open(image))[8:, 8:])


def test_eval_names_an_unusable_image_folder_before_drawing(tmp_path):
    (tmp_path / "taken").write_text("a file")
    run = run_cli(
        "eval", "shapes", "--model", str(tmp_path / "no-model"), "--save-images", str(tmp_path / "taken")
    )
    assert run.returncode == 2 and "is a file" in run.stderr and "no model" not in run.stderr, run.stderr


def test_a_loaded_model_keeps_a_bounded_number_of_prompt_encodings(model):
    """Issue 12: every distinct prompt was cached for ever (about 60 KB each) in a long-running server."""
    from unnoise.pipeline import PROMPT_CACHE

    pipe = unnoise.load(model)
    assert pipe.text.max_entries == PROMPT_CACHE  # the cache itself is tested in test_text_encoders.py
    pipe.text.max_entries = 2
    pipe.generate(
        "a red circle", steps=1, guidance=2.0, seed=1
    )  # caches "a red circle" and "" (unconditional)
    pipe.generate("a blue square", steps=1, guidance=2.0, seed=1)
    assert len(pipe.text) == 2 and "a red circle" not in pipe.text and "a blue square" in pipe.text


def test_device_auto_picks_cuda_then_mps_then_the_cpu(monkeypatch):
    """Issue 13: every model command takes --device (auto, cpu, cuda, mps); auto prefers a GPU."""
    from unnoise.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(UnnoiseError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(UnnoiseError, match="unknown device 'tpu0'"):
        resolve_device("tpu0")


@pytest.mark.parametrize("command", ["generate", "edit", "inpaint", "interpolate", "eval", "serve"])
def test_every_command_that_runs_a_model_takes_device_and_threads(command):
    from unnoise.cli import build_parser

    positional = {"generate": ["x"], "edit": ["i.png", "x"], "inpaint": ["i.png", "m.png", "x"],
                  "interpolate": ["x"], "eval": ["shapes"], "serve": []}[command]  # fmt: skip
    args = build_parser().parse_args([command, *positional, "--device", "cpu", "--threads", "1"])
    assert (args.device, args.threads) == ("cpu", 1)
