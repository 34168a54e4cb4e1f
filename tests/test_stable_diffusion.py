"""Issue 32: Stable Diffusion folders users have, loaded by unnoise. Tiny randomly initialised SD-shaped
pipelines are built here with diffusers' and transformers' own classes (a CLIP tokenizer of single
characters, no download), saved as a diffusers folder, and loaded with `unnoise.load`."""

from __future__ import annotations

import json

import pytest
import torch

import unnoise
from unnoise.errors import UnnoiseError
from unnoise.settings import ImageSettings
from unnoise.stable_diffusion import VAECodec

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from tests.sd_fixtures import ROWS, parity, save_tiny_sd  # noqa: E402  (needs diffusers)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def sd_v_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd-v") / "tiny-sd-v", "v_prediction")


@pytest.fixture(scope="module")
def pipe(sd_folder):
    return unnoise.load(sd_folder, device="cpu")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row.sampler}-{row.schedule}-eta{row.eta:g}")
def test_the_diffusers_convention_gives_diffusers_latents(row, prediction, sd_folder, sd_v_folder):
    """The parity table (issue 32 point 3): with the diffusers convention, unnoise's sampler and diffusers'
    scheduler of the same name, from the same seed (starting latents and every step's noise), give the same
    x0 estimate at every step and the same final latents, for epsilon and v prediction."""
    folder = sd_folder if prediction == "epsilon" else sd_v_folder
    pipe = unnoise.load(folder, device="cpu", convention="diffusers")
    final, x0 = parity(pipe, folder, row)
    assert final < 2e-5 and x0 < 1e-4, (final, x0)  # relative: float32 round-off, 1e-6 to 3e-5


def test_a_diffusers_folder_loads_and_generates_through_its_vae(pipe):
    assert (pipe.resolution, pipe.codec.factor, pipe.codec.channels) == (16, 2, 4)
    assert isinstance(pipe.codec, VAECodec) and pipe.codec.scaling == 0.18215
    first = pipe.generate("a red cat", seed=3, steps=3)[0]
    again = pipe.generate("a red cat", seed=3, steps=3)[0]
    assert first.size == (16, 16) and first.tobytes() == again.tobytes()
    assert pipe.generate("a red cat", seed=4, steps=3)[0].tobytes() != first.tobytes()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_denoiser_is_the_unet_read_as_its_scheduler_says(prediction, sd_folder, sd_v_folder):
    """D(x; sigma) from the UNet's raw output at the timestep of sigma, the input scaled by 1/sqrt(1+s^2):
    x - sigma eps for epsilon prediction; x / (1 + s^2) - s v / sqrt(1 + s^2) for v prediction."""
    folder = sd_folder if prediction == "epsilon" else sd_v_folder
    pipe = unnoise.load(folder, device="cpu", convention="diffusers")  # its table in float32, as diffusers'
    cond = pipe.text.encode(["a red cat", "a blue dog"])
    unet = pipe.denoiser.network.unet
    scheduler = diffusers.DDIMScheduler.from_pretrained(
        sd_folder if prediction == "epsilon" else sd_v_folder, subfolder="scheduler"
    )
    t = torch.tensor([999, 500])
    alpha_bar = scheduler.alphas_cumprod[t].double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt().float()  # (2,) the sigmas of timesteps 999 and 500
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigma[:, None, None, None]
    with torch.no_grad():
        ours = pipe.denoiser_for(ImageSettings("", sampler="ddim"))(x, sigma, cond)  # DDIMScheduler's way
        scale = (1 + sigma**2).rsqrt()[:, None, None, None]
        out = unet(x * scale, t, encoder_hidden_states=cond.tokens).sample
    s = sigma[:, None, None, None]
    expected = x - s * out if prediction == "epsilon" else x / (1 + s**2) - s * out * scale
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_clip_skip_takes_an_earlier_layer_with_the_final_norm(pipe):
    from unnoise.stable_diffusion import CLIPTextEncoder, final_layer_norm

    encoder = pipe.text.encoder
    skip = CLIPTextEncoder(encoder.tokenizer, encoder.model, "x", clip_skip=2)
    ids = encoder.tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder.model(ids, output_hidden_states=True).hidden_states
        expected = final_layer_norm(encoder.model)(hidden[-2])
    torch.testing.assert_close(skip.encode(["a cat"]).tokens, expected)
    assert not torch.allclose(encoder.encode(["a cat"]).tokens, expected)
    with pytest.raises(UnnoiseError, match="clip skip"):
        CLIPTextEncoder(encoder.tokenizer, encoder.model, "x", clip_skip=3)


def test_pickled_weights_are_refused_with_the_conversion(sd_folder, tmp_path):
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "pickled")
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UnnoiseError, match=r"pickled weights \(diffusion_pytorch_model.bin\)"):
        unnoise.load(folder, device="cpu")


def test_the_server_serves_an_sd_folder_to_webuiapi_and_openai_with_their_defaults(sd_folder, tmp_path):
    """Issue 32 point 5: the same client calls as for our own models (txt2img, img2img, inpainting with a
    mask, png_info, images.generate), A1111's model hash, and <lora:NAME:WEIGHT> over the server's LoRA
    folder (listed at /sdapi/v1/loras; a name that leaves the folder is refused)."""
    import base64
    import io
    import shutil

    import openai
    import requests
    import webuiapi
    from PIL import Image

    from tests.sd_fixtures import lora_layers, save_kohya_lora
    from tests.test_server import Server, free_port
    from unnoise.release import sha256
    from unnoise.server.app import create_app

    pipe = unnoise.load(sd_folder, device="cpu")
    loras = tmp_path / "loras"
    loras.mkdir()
    save_kohya_lora(loras / "style.safetensors", lora_layers(pipe))
    shutil.copy(loras / "style.safetensors", tmp_path / "outside.safetensors")
    port = free_port()
    running = Server(create_app(pipe, port=port, models={"tiny-sd": sd_folder}, lora_folder=loras), port)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        made = api.txt2img(prompt="a red cat", steps=3, seed=4)
        digest = sha256(next((sd_folder / "unet").glob("*.safetensors")))
        assert f"Model hash: {digest[:10]}, Model: tiny-sd" in made.info["infotexts"][0]
        listed = {m["model_name"]: m for m in api.get_sd_models()}
        assert listed["tiny-sd"]["hash"] == digest[:10] and listed["tiny-sd"]["sha256"] == digest
        edited = api.img2img(images=[made.image], prompt="a blue cat", steps=3, denoising_strength=0.5)
        assert edited.image.size == made.image.size
        mask = Image.new("L", made.image.size, 0)
        mask.paste(255, (0, 0, 8, 8))
        painted = api.img2img(
            images=[made.image], mask_image=mask, prompt="a dog", steps=3, inpainting_fill=1
        )
        kept = [
            (x, y) for x in range(10, 16) for y in range(10, 16)
            if painted.image.getpixel((x, y)) != made.image.getpixel((x, y))
        ]  # fmt: skip
        assert kept == []  # the pixels outside the (blurred) mask are the input's exactly
        assert "Seed: 4" in api.png_info(made.image).info
        assert [lora["name"] for lora in api.get_loras()] == ["style"]
        styled = api.txt2img(prompt="a red cat <lora:style:1>", steps=3, seed=4)
        assert styled.image.tobytes() != made.image.tobytes()
        assert "<lora:style:1>" in styled.info["infotexts"][0]
        zero = api.txt2img(prompt="a red cat <lora:style:0>", steps=3, seed=4)
        assert zero.image.tobytes() == made.image.tobytes()
        for name in ("../outside", "/etc/passwd", "missing"):
            body = {"prompt": f"x <lora:{name}:1>", "steps": 2}
            refused = requests.post(f"{running.url}/sdapi/v1/txt2img", json=body, timeout=30)
            assert refused.status_code == 422, (name, refused.text)
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
        image = client.images.generate(prompt="a blue dog", response_format="b64_json")
        assert Image.open(io.BytesIO(base64.b64decode(image.data[0].b64_json))).size[0] >= 16
    finally:
        running.stop()
    assert pipe.lora_hooks == []  # every prompt's LoRA was taken off after its job


@pytest.mark.parametrize("damage", ["no tokenizer", "cut weights", "no unet config", "oversized unet config"])
def test_a_damaged_sd_folder_is_one_line(damage, sd_folder, tmp_path):
    import shutil

    from tests.conftest import run_cli

    folder = shutil.copytree(sd_folder, tmp_path / "damaged")
    if damage == "no tokenizer":
        shutil.rmtree(folder / "tokenizer")
    elif damage == "cut weights":
        weights = next((folder / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "no unet config":
        (folder / "unet" / "config.json").unlink()
    else:  # asks for a 100,000-channel level: refused from the headers, before anything is allocated
        config = json.loads((folder / "unet" / "config.json").read_text())
        config["block_out_channels"] = [32, 100_000]
        (folder / "unet" / "config.json").write_text(json.dumps(config))
    done = run_cli("generate", "a cat", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_cli_samples_an_sd_folder_by_a_convention_and_from_png_makes_it_again(sd_folder, tmp_path):
    """Euler's Automatic schedule is AUTOMATIC1111's uniform one; the PNG says so and re-creates the image."""
    from PIL import Image

    from tests.conftest import run_cli

    out = tmp_path / "made"
    made = run_cli(
        "generate", "a red cat", "--model", str(sd_folder), "--sampler", "Euler", "--steps", "3",
        "--seed", "5", "--clip-skip", "2", "--out", str(out),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    png = next(out.glob("*.png"))
    assert "Sampler: Euler, Schedule type: Uniform" in Image.open(png).info["parameters"]
    again = run_cli("generate", "--from-png", str(png), "--model", str(sd_folder), "--clip-skip", "2",
                    "--out", str(tmp_path / "again"))  # fmt: skip
    assert again.returncode == 0, again.stderr
    redone = next((tmp_path / "again").glob("*.png"))
    assert Image.open(redone).tobytes() == Image.open(png).tobytes()
    wrong = run_cli("generate", "a cat", "--model", str(sd_folder), "--convention", "diffusers", "--sampler",
                    "heun", "--steps", "2", "--out", str(tmp_path / "w"))  # fmt: skip
    assert wrong.returncode == 2 and "diffusers convention covers" in wrong.stderr, wrong.stderr


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_a_lora_changes_the_image_and_at_scale_0_gives_the_base_bit_for_bit(layout, sd_folder, tmp_path):
    from tests.sd_fixtures import lora_layers, save_kohya_lora, save_peft_lora

    pipe = unnoise.load(sd_folder, device="cpu")
    base = pipe.generate("a red cat", seed=3, steps=3)[0].tobytes()
    save = save_kohya_lora if layout == "kohya" else save_peft_lora
    path = save(tmp_path / f"{layout}.safetensors", lora_layers(pipe))
    pipe.add_lora(path, 1.0)
    changed = pipe.generate("a red cat", seed=3, steps=3)[0].tobytes()
    pipe.remove_loras()
    assert changed != base and pipe.generate("a red cat", seed=3, steps=3)[0].tobytes() == base
    pipe.add_lora(path, 0.0)
    assert pipe.generate("a red cat", seed=3, steps=3)[0].tobytes() == base


def test_a_merged_lora_matches_the_hooked_one_and_its_text_part_counts(sd_folder, tmp_path):
    """alpha / rank scales the update (kohya alpha 2, rank 4: half); merged in float32 = hooked."""
    from tests.sd_fixtures import lora_layers, save_kohya_lora

    hooked = unnoise.load(sd_folder, device="cpu")
    layers = lora_layers(hooked)
    path = save_kohya_lora(tmp_path / "k.safetensors", layers)
    hooked.add_lora(path, 0.7)
    merged = unnoise.load(sd_folder, device="cpu")
    merged.add_lora(path, 0.7, merge=True)
    a = hooked.generate("a red cat", seed=3, steps=3, output_type="latent")
    b = merged.generate("a red cat", seed=3, steps=3, output_type="latent")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    text_only = unnoise.load(sd_folder, device="cpu")
    base = text_only.encode(["a red cat"]).tokens
    text_only.add_lora(save_kohya_lora(tmp_path / "t.safetensors", [x for x in layers if x[0] == "text"]))
    assert not torch.allclose(text_only.encode(["a red cat"]).tokens, base)  # the prompt cache was cleared


@pytest.mark.parametrize(
    "damage, message",
    [
        ("loha", "LoHa is not supported"),
        ("other model", "match nothing in this model"),
        ("pickle", "read as .safetensors only"),
        ("stray key", "keys that are no LoRA layer"),
    ],
)
def test_a_lora_it_cannot_apply_is_an_error_that_names_it(damage, message, pipe, tmp_path):
    from safetensors.torch import save_file

    from tests.sd_fixtures import lora_layers, save_kohya_lora

    path = tmp_path / "x.safetensors"
    if damage == "loha":
        save_file(
            {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.ones(2, 2)}, path
        )
    elif damage == "other model":
        save_file({"lora_unet_mid_block_nothing.lora_down.weight": torch.zeros(2, 4),
                   "lora_unet_mid_block_nothing.lora_up.weight": torch.zeros(4, 2)}, path)  # fmt: skip
    elif damage == "pickle":
        path = tmp_path / "x.pt"
        path.write_bytes(b"not read")
    else:
        save_kohya_lora(path, lora_layers(pipe)[:1])
        from safetensors.torch import load_file

        save_file({**load_file(path), "something_else": torch.zeros(1)}, path)
    with pytest.raises(UnnoiseError, match=message):
        pipe.add_lora(path)
    assert pipe.lora_hooks == []


def test_the_cli_takes_lora_path_and_scale(pipe, sd_folder, tmp_path):
    from PIL import Image

    from tests.conftest import run_cli
    from tests.sd_fixtures import lora_layers, save_kohya_lora

    path = save_kohya_lora(tmp_path / "style.safetensors", lora_layers(pipe))
    made = {}
    for name, extra in (("base", []), ("zero", ["--lora", f"{path}:0"]), ("one", ["--lora", str(path)])):
        done = run_cli("generate", "a red cat", "--model", str(sd_folder), "--steps", "2", "--seed", "1",
                       "--out", str(tmp_path / name), *extra)  # fmt: skip
        assert done.returncode == 0, done.stderr
        made[name] = Image.open(next((tmp_path / name).glob("*.png"))).tobytes()
    assert made["zero"] == made["base"] != made["one"]


# --- single-file checkpoints ---------------------------------------------------------------------------


def test_a_single_file_checkpoint_gives_its_diffusers_folders_image(pipe, sd_folder, tmp_path):
    """The folder's parts in CompVis' layout, one .safetensors file, its config from the folder: the same
    image bit for bit, named by the file, with A1111's hash (the file's SHA-256)."""
    from tests.sd_fixtures import save_single_file
    from unnoise.release import sha256

    path = save_single_file(sd_folder, tmp_path / "tiny-single.safetensors")
    single = unnoise.load(path, device="cpu", config_from=sd_folder)
    assert (single.name, single.model_hash) == ("tiny-single", sha256(path)[:10])
    ours = single.generate("a red cat", seed=3, steps=3)[0]
    assert ours.tobytes() == pipe.generate("a red cat", seed=3, steps=3)[0].tobytes()
    assert "Model hash: " + sha256(path)[:10] in ours.info["parameters"]


def test_the_shipped_family_configs_are_sd_1_5s_and_the_tokenizer_is_clips():
    """Parameter counts of SD 1.5's published parts (UNet 859.5M, VAE 83.7M, CLIP text 123.1M) from the
    configs unnoise ships, and CLIP's token ids from its shipped BPE vocabulary."""
    from unnoise.single_file import FAMILIES, VAE_CONFIG, clip_tokenizer

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(FAMILIES["sd1"].unet)
        vae = diffusers.AutoencoderKL.from_config(VAE_CONFIG)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**FAMILIES["sd1"].text))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    ids = clip_tokenizer("<|endoftext|>")("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert clip_tokenizer("!").pad_token_id == 0  # SD 2's OpenCLIP tokenizer pads with "!"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("sd2 without a hint", "give --prediction-type epsilon or v"),
        ("sdxl", "SDXL is not supported yet"),
        ("a lora", "not a Stable Diffusion checkpoint"),
        ("pickle", "a pickled checkpoint, which unnoise never loads"),
        ("cut", "not a readable safetensors file"),
    ],
)
def test_a_single_file_unnoise_cannot_load_is_one_line(kind, message, sd_folder, tmp_path):
    from safetensors.torch import save_file

    from tests.conftest import run_cli

    path = tmp_path / "model.safetensors"
    one = torch.zeros(1)
    if kind == "sd2 without a hint":
        save_file(
            {
                "model.diffusion_model.x": one,
                "first_stage_model.x": one + 1,
                "cond_stage_model.model.x": one + 2,
            },
            path,
        )
    elif kind == "sdxl":
        save_file({"model.diffusion_model.x": one, "conditioner.embedders.0.x": one + 1}, path)
    elif kind == "a lora":
        save_file({"lora_unet_x.lora_down.weight": one, "lora_unet_x.lora_up.weight": one + 1}, path)
    elif kind == "pickle":
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"PK not read")
    else:
        save_file({"model.diffusion_model.x": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:200])
    done = run_cli("generate", "a cat", "--model", str(path), "--steps", "1", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_an_sd2_files_prediction_type_comes_from_the_flag_or_a_yaml_beside_it(tmp_path):
    from unnoise.single_file import prediction_hint

    path = tmp_path / "sd2.safetensors"
    assert prediction_hint(path, None) is None and prediction_hint(path, "v") == "v_prediction"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert prediction_hint(path, None) == "v_prediction"
    path.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert prediction_hint(path, None) == "epsilon"


def test_a_hugging_face_id_offline_is_one_line_that_says_so(tmp_path):
    """Never downloads in tests: the Hub is switched off, as on a machine without a network."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "unnoise", "generate", "a cat", "--model", "someone/no-such-model"]
    done = subprocess.run([*command, "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "cannot get it from the Hugging Face Hub" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_single_file_that_does_not_fit_its_config_and_a_cut_lora_are_one_line(pipe, sd_folder, tmp_path):
    import shutil

    from tests.sd_fixtures import lora_layers, save_kohya_lora, save_single_file

    path = save_single_file(sd_folder, tmp_path / "tiny.safetensors")
    other = shutil.copytree(sd_folder, tmp_path / "other")
    config = json.loads((other / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 64  # another model's shape
    (other / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnnoiseError, match="its UNet does not fit the config"):
        unnoise.load(path, device="cpu", config_from=other)
    lora = save_kohya_lora(tmp_path / "cut.safetensors", lora_layers(pipe))
    lora.write_bytes(lora.read_bytes()[:300])
    with pytest.raises(UnnoiseError, match="not a readable safetensors file"):
        pipe.add_lora(lora)


def test_a_zero_terminal_snr_schedule_has_diffusers_finite_top_sigma_and_table():
    """rescale_betas_zero_snr (Lin et al. 2024): the rescaled table, alpha_bar at the last step 2^-24, so
    the top sigma is finite (about 4096), as diffusers makes it."""
    from unnoise.diffusion.formulations import VPDiscrete
    from unnoise.stable_diffusion import SchedulerConfig

    ours = SchedulerConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction").formulation()
    ours = VPDiscrete(**{**ours.__dict__, "schedule_precision": "float32"})
    theirs = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True
    )
    table = ((1 - theirs.alphas_cumprod) / theirs.alphas_cumprod).sqrt().double()
    assert 4000 < ours.sigma_max < 4200 and abs(ours.sigma_max - float(table[-1])) < 1e-3
    torch.testing.assert_close(ours.table, table, rtol=1e-5, atol=1e-6)
