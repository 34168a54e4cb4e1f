"""Issue 32: Stable Diffusion folders users have, loaded by unnoise. Tiny randomly initialised SD-shaped
pipelines are built here with diffusers' and transformers' own classes (a CLIP tokenizer of single
characters, no download), saved as a diffusers folder, and loaded with `unnoise.load`."""

from __future__ import annotations

import pytest
import torch

import unnoise
from unnoise.errors import UnnoiseError
from unnoise.stable_diffusion import VAECodec

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def byte_characters() -> list[str]:
    """The 256 printable characters byte-level BPE (GPT-2, CLIP) writes the bytes 0..255 as."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    table = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    return [table[b] for b in range(256)]


def tiny_tokenizer():
    """A CLIP tokenizer whose vocabulary is every byte's character, alone and word-final, and no merges."""
    characters = byte_characters()
    tokens = [*characters, *(c + "</w>" for c in characters), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def save_tiny_sd(folder, prediction_type: str = "epsilon"):
    """An SD-1.x-shaped diffusers folder: UNet (2 levels, cross-attention), VAE (factor 2), CLIP text model
    (2 layers), scheduler config of SD 1.5's betas, random weights, safetensors."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=16,
    )  # fmt: skip
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def sd_v_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd-v") / "tiny-sd-v", "v_prediction")


@pytest.fixture(scope="module")
def pipe(sd_folder):
    return unnoise.load(sd_folder, device="cpu")


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
    pipe = unnoise.load(sd_folder if prediction == "epsilon" else sd_v_folder, device="cpu")
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
        ours = pipe.denoiser(x, sigma, cond)
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


def test_euler_matches_diffusers_euler_scheduler_from_the_same_latents(pipe, sd_folder):
    """At integer timesteps ("leading" spacing, SD 1.5's DDIM convention) diffusers' EulerDiscreteScheduler
    and unnoise's `euler` over its sigmas, from the same starting latents, give the same latents."""
    from unnoise.diffusion.samplers import SAMPLERS

    scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(
        sd_folder, subfolder="scheduler", timestep_spacing="leading"
    )
    scheduler.set_timesteps(6)
    cond = pipe.text.encode(["a red cat"])
    unet = pipe.denoiser.network.unet
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    x = start.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=cond.tokens).sample
            x = scheduler.step(eps, t, x).prev_sample
        ours = SAMPLERS["euler"](pipe.denoiser, start.clone(), scheduler.sigmas.double(), cond=cond)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_pickled_weights_are_refused_with_the_conversion(sd_folder, tmp_path):
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "pickled")
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UnnoiseError, match=r"pickled weights \(diffusion_pytorch_model.bin\)"):
        unnoise.load(folder, device="cpu")


def test_the_server_serves_an_sd_folder_to_webuiapi_and_openai_with_their_defaults(pipe):
    """Issue 32 point 5 (a first check): the same client calls as for our own models."""
    import base64
    import io

    import openai
    import webuiapi
    from PIL import Image

    from tests.test_server import Server, free_port
    from unnoise.server.app import create_app

    port = free_port()
    running = Server(create_app(pipe, port=port, models={}), port)
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        result = api.txt2img(prompt="a red cat", steps=3)
        assert result.image.size[0] >= 16 and "Model: tiny-sd" in result.info["infotexts"][0]
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="not-needed-on-loopback", max_retries=0)
        made = client.images.generate(prompt="a blue dog", response_format="b64_json")
        image = Image.open(io.BytesIO(base64.b64decode(made.data[0].b64_json)))
        assert image.size[0] >= 16
    finally:
        running.stop()


@pytest.mark.parametrize("damage", ["no tokenizer", "cut weights", "no unet config"])
def test_a_damaged_sd_folder_is_one_line(damage, sd_folder, tmp_path):
    import shutil

    from tests.conftest import run_cli

    folder = shutil.copytree(sd_folder, tmp_path / "damaged")
    if damage == "no tokenizer":
        shutil.rmtree(folder / "tokenizer")
    elif damage == "cut weights":
        weights = next((folder / "unet").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (folder / "unet" / "config.json").unlink()
    done = run_cli("generate", "a cat", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
