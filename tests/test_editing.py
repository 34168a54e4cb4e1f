"""Editing: img2img, inpainting, variations and interpolation, against exact answers where they exist.

On Gaussian data the probability-flow ODE from sigma to 0 is the affine map x0 = mu + a (x - mu) with
a = s / sqrt(s^2 + sigma^2), and the posterior p(x0 | x_sigma) is N(mu + g (x - mu), g sigma^2) with
g = s^2 / (s^2 + sigma^2); so SDEdit from a fixed input has a known output distribution for both kinds of
sampler.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import unnoise
from unnoise.diffusion.editing import img2img, img2img_start, inpaint, masked_start, repaint_plan, slerp
from unnoise.diffusion.samplers import sample
from unnoise.diffusion.schedules import karras
from unnoise.errors import UnnoiseError
from unnoise.images import masked_area
from unnoise.settings import ImageSettings
from unnoise.testing import GaussianMixture

MU, S = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.7
GAUSSIAN = GaussianMixture(MU[None], S)
INPUT = torch.tensor([2.5, 0.5], dtype=torch.float64)  # the image being edited, far from the mean
N = 20_000


def edited(sampler: str, steps: int, strength: float, **options) -> tuple[torch.Tensor, float]:
    """N SDEdit outputs for INPUT, and the noise level sigma_k they started from."""
    generator = torch.Generator().manual_seed(0)
    sigmas = karras(steps, 0.002, 80.0)
    noise = torch.randn(N, 2, generator=generator, dtype=torch.float64)
    x = img2img(
        GAUSSIAN,
        INPUT.expand(N, 2),
        noise,
        sigmas,
        strength=strength,
        sampler=sampler,
        generator=generator,
        **options,
    )
    return x, float(sigmas[img2img_start(steps, strength)])


def test_strength_zero_returns_the_input_and_runs_no_step():
    calls = []

    def denoiser(x, sigma, cond=None):
        calls.append(sigma)
        return x

    init = torch.randn(3, 2)
    assert img2img(denoiser, init, torch.randn(3, 2), karras(10), strength=0.0) is init
    assert calls == []


def test_strength_one_starts_from_noise_alone_as_generation_does():
    sigmas, noise = karras(12, 0.002, 80.0), torch.randn(5, 2, dtype=torch.float64)
    generated = sample(GAUSSIAN, noise, sigmas, sampler="dpmpp_2m")
    edited_ = img2img(GAUSSIAN, INPUT.expand(5, 2), noise, sigmas, strength=1.0, sampler="dpmpp_2m")
    torch.testing.assert_close(edited_, generated, rtol=0, atol=0)


def test_the_strength_picks_how_many_of_the_last_steps_run():
    assert [img2img_start(20, s) for s in (0.0, 0.25, 0.5, 0.75, 1.0)] == [20, 15, 10, 5, 0]


@pytest.mark.parametrize("strength", [0.3, 0.6])
def test_ode_img2img_gives_the_exact_pushforward_of_the_noised_input(strength):
    x, sigma = edited("heun", 30, strength)
    a = S / math.sqrt(S**2 + sigma**2)
    mean, std = MU + a * (INPUT - MU), a * sigma  # per coordinate
    standard_error = std / math.sqrt(N)
    assert torch.all((x.mean(0) - mean).abs() < 4 * standard_error + 1e-3), (x.mean(0), mean)
    assert torch.all((x.std(0) / std - 1).abs() < 0.03), (x.std(0), std)


def test_sde_img2img_samples_the_posterior_of_the_noised_input():
    x, sigma = edited("dpmpp_2m_sde", 100, 0.5)  # euler_ancestral is 5% off at 100 steps, 0.5% at 800
    g = S**2 / (S**2 + sigma**2)
    mean, std = MU + g * (INPUT - MU), math.sqrt(g**2 * sigma**2 + g * sigma**2)
    standard_error = std / math.sqrt(N)
    assert torch.all((x.mean(0) - mean).abs() < 4 * standard_error + 5e-3), (x.mean(0), mean)
    assert torch.all((x.std(0) / std - 1).abs() < 0.03), (x.std(0), std)


def test_ode_and_sde_img2img_differ_where_the_math_says():  # the two answers above are not the same one
    _, sigma = edited("heun", 30, 0.6)
    a, g = S / math.sqrt(S**2 + sigma**2), S**2 / (S**2 + sigma**2)
    assert abs(a - g) > 0.05


# --- inpainting ---------------------------------------------------------------------------------------


def inpainted(mixture, known_value, *, sampler, steps=50, jump=1, resample=1, n=N) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    known = torch.tensor([[known_value, 0.0]], dtype=torch.float64).expand(n, 2)
    mask = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # regenerate coordinate 2
    noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return inpaint(
        mixture,
        known,
        mask,
        noise,
        karras(steps, 0.002, 80.0),
        sampler=sampler,
        generator=generator,
        jump=jump,
        resample=resample,
    )


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "heun"])
def test_inpainting_keeps_the_known_part_bit_for_bit(sampler):
    x = inpainted(GAUSSIAN, 0.123456789, sampler=sampler, steps=8, n=64, resample=2, jump=3)
    assert torch.equal(x[:, 0], torch.full((64,), 0.123456789, dtype=torch.float64))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_inpainting_independent_coordinates_gives_their_exact_conditional(sampler):
    # for an isotropic Gaussian the unknown coordinate is independent of the known one: N(mu_2, s^2)
    x2 = inpainted(GAUSSIAN, 3.0, sampler=sampler, steps=60)[:, 1]
    assert abs(float(x2.mean()) - float(MU[1])) < 4 * S / math.sqrt(N) + 5e-3
    assert abs(float(x2.std()) / S - 1) < 0.03


def test_repaint_resampling_moves_a_mixture_towards_its_true_conditional():
    """Two components at +-(1.5, 1.5): knowing x1 = 0.3 makes the upper one likelier, E[x2 | x1] = 0.633.

    Replacing the known part alone is biased towards the prior (its samples barely learn which component
    x1 points to); RePaint's resampling cuts that bias. It does not remove it: with -s this test prints
    E[x2] = 0.145 without resampling and 0.456 with jump 10, resample 10 (4,000 samples; see the README)."""
    mixture = GaussianMixture([[-1.5, -1.5], [1.5, 1.5]], 1.0)
    w_up = 1 / (1 + math.exp(-((0.3 + 1.5) ** 2 - (0.3 - 1.5) ** 2) / 2))
    truth = w_up * 1.5 - (1 - w_up) * 1.5
    plain = inpainted(mixture, 0.3, sampler="euler_ancestral", n=4000)[:, 1].mean()
    repaint = inpainted(mixture, 0.3, sampler="euler_ancestral", jump=10, resample=10, n=4000)[:, 1].mean()
    print(f"E[x2 | x1 = 0.3]: exact {truth:.3f}, inpainted {plain:.3f}, with RePaint {repaint:.3f}")
    assert abs(truth - 0.6328) < 1e-3
    assert abs(float(repaint) - truth) < 0.6 * abs(float(plain) - truth), (
        float(plain),
        float(repaint),
        truth,
    )


def test_repaint_plan_repeats_each_block():
    assert repaint_plan(6, jump=2, resample=3) == [(0, 2)] * 3 + [(2, 4)] * 3 + [(4, 6)] * 3
    assert repaint_plan(5, jump=2, resample=2) == [(0, 2), (0, 2), (2, 4), (2, 4), (4, 5), (4, 5)]
    assert repaint_plan(5, jump=2) == [(0, 5)]  # no resampling: one run of the sampler
    with pytest.raises(UnnoiseError, match="at least 1"):
        repaint_plan(5, jump=0)


# --- variations ---------------------------------------------------------------------------------------


def test_slerp_ends_are_exact_and_the_middle_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    middle = slerp(a, b, 0.5)
    norms = middle.flatten(1).norm(dim=1) / (0.5 * (a.flatten(1).norm(dim=1) + b.flatten(1).norm(dim=1)))
    assert torch.all((norms - 1).abs() < 0.02)  # a linear mix would shrink it to about 0.71
    torch.testing.assert_close(slerp(a, a, 0.3), a)  # parallel: no division by sin(0)


# --- the pipeline and its edges -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return unnoise.load("shapes-32")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_pipeline_edit_at_strength_zero_is_the_input_and_one_is_generation(pipe):
    image = pipe.generate("a red circle", seed=3, steps=8)[0]
    assert np.array_equal(pixels(pipe.edit(image, "a blue square", strength=0.0, steps=8)[0]), pixels(image))
    edited_ = pipe.edit(image, "a blue square", strength=1.0, seed=5, steps=8)[0]
    assert np.array_equal(pixels(edited_), pixels(pipe.generate("a blue square", seed=5, steps=8)[0]))
    assert "Denoising strength: 1" in edited_.info["parameters"]


def test_pipeline_edit_takes_any_size_and_mode_and_answers_in_its_size(pipe):
    rgba = Image.new("RGBA", (90, 50), (40, 90, 230, 128))
    out = pipe.edit(rgba, "a blue square", strength=0.5, steps=4, seed=0, num_images=2)
    assert [im.size for im in out] == [(90, 50)] * 2 and out[0].mode == "RGB"
    assert pipe.edit(rgba, "a blue square", strength=0.5, steps=4, resize_back=False)[0].size == (32, 32)


def test_pipeline_inpaint_keeps_every_pixel_outside_the_mask(pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))  # an odd size: resized twice
    mask = Image.new("1", (70, 45), 0)
    mask.paste(1, (10, 5, 40, 30))
    for feather in (0, 3):
        out = pipe.inpaint(image, mask, "a green triangle", steps=6, seed=1, num_images=2, feather=feather)
        weight = mask.convert("L")
        keep = np.asarray(weight.filter(ImageFilter.GaussianBlur(feather)) if feather else weight) == 0
        for im in out:
            assert im.size == (70, 45)
            assert np.array_equal(pixels(im)[keep], pixels(image)[keep])
            assert not np.array_equal(pixels(im)[~keep], pixels(image)[~keep])


def test_masked_area_inpainting_also_keeps_every_pixel_outside_the_mask(pipe):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (48, 64), 0)
    mask.paste(255, (30, 40, 44, 50))
    out = pipe.inpaint(image, mask, "a red circle", area="masked", padding=3, steps=4, seed=0)[0]
    keep = np.asarray(mask) == 0
    assert out.size == (48, 64)
    assert np.array_equal(pixels(out)[keep], pixels(image)[keep])
    assert not np.array_equal(pixels(out)[~keep], pixels(image)[~keep])
    assert "Inpaint area: Only masked, Masked area padding: 3" in out.info["parameters"]


def test_a_run_stopped_by_its_callback_is_finished_as_a_complete_one(pipe):
    """AUTOMATIC1111's interrupt: a callback raising StopSamplingError ends sampling at that step; the
    images come from that step's x0 estimates, composited into the input like a complete inpainting."""
    from unnoise.pipeline import StopSamplingError

    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    mask = Image.new("L", (48, 64), 0)
    mask.paste(255, (30, 40, 44, 50))
    seen = []

    def stop_at_the_second_step(step):
        seen.append(step.index)
        if len(seen) == 2:
            raise StopSamplingError(step.denoised, "step 2 of 8")

    out = pipe.inpaint(
        image, mask, "a red circle", steps=8, resample=1, seed=0, callback=stop_at_the_second_step
    )
    keep = np.asarray(mask) == 0
    assert len(seen) == 2 and out[0].size == (48, 64)
    assert np.array_equal(pixels(out[0])[keep], pixels(image)[keep])
    assert out[0].info["parameters"].endswith("Interrupted: step 2 of 8")
    seen.clear()
    edit = pipe.edit(image, "a red circle", strength=1.0, steps=8, seed=0, callback=stop_at_the_second_step)
    assert len(seen) == 2 and edit[0].size == (48, 64)  # resized back to the input's size, as a complete one
    assert edit[0].info["parameters"].endswith("Interrupted: step 2 of 8")


def test_the_masked_area_is_a_square_around_the_mask_inside_the_image():
    mask = Image.new("L", (48, 64), 0)
    mask.paste(255, (30, 40, 44, 50))  # 14 x 10 pixels
    assert masked_area(mask, 3) == (27, 35, 47, 55)  # 20 x 20, centred on the mask
    mask.paste(255, (40, 0, 48, 4))  # now reaching the top right corner
    left, top, right, bottom = masked_area(mask, 3)
    assert (right, top) == (48, 0) and right - left == 48 and bottom - top == 56
    assert masked_area(Image.new("L", (8, 8)), 3) is None


def test_variation_strength_one_is_the_other_seed_and_interpolation_ends_are_the_prompts(pipe):
    settings = dict(steps=6)
    other = pipe.generate("a red circle", seed=9, **settings)[0]
    varied = pipe.generate("a red circle", seed=1, variation_seed=9, variation_strength=1.0, **settings)[0]
    assert np.array_equal(pixels(varied), pixels(other))
    frames = pipe.interpolate(
        "a red circle", to_prompt="a blue square", seed=1, to_seed=9, frames=3, **settings
    )
    first = pipe.generate("a red circle", seed=1, **settings)[0]
    assert np.abs(pixels(frames[0]).astype(int) - pixels(first)).max() <= 1
    last = pipe.generate("a blue square", seed=9, **settings)[0]
    # the frames go through the network as one batch: float rounding may move a pixel by one level
    assert np.abs(pixels(frames[-1]).astype(int) - pixels(last)).max() <= 1
    middle = ImageSettings.from_parameters(frames[1].info["parameters"])
    assert (middle.variation_seed, middle.variation_strength, middle.prompt_mix) == (9, 0.5, 0.5)
    assert middle.mix_prompt == "a blue square"
    again = pipe.generate(
        middle.prompt,
        seed=middle.seed,
        variation_seed=9,
        variation_strength=0.5,
        mix_prompt=middle.mix_prompt,
        prompt_mix=0.5,
        **settings,
    )[0]
    assert np.abs(pixels(again).astype(int) - pixels(frames[1])).max() <= 1


def test_editing_parameters_round_trip_through_the_png_text():
    request = ImageSettings(
        "a cat",
        "blurry",
        "ddim",
        {"eta": 0.5},
        steps=12,
        guidance=2.5,
        seed=7,
        width=32,
        height=32,
        model="m",
        repaint_jump=2,
        repaint_resample=5,
        variation_seed=3,
        variation_strength=1 / 3,
        mix_prompt="a dog",
        prompt_mix=0.25,
        denoising_strength=0.6,
        mask_blur=4,
        inpaint_area="masked",
        masked_padding=6,
    )
    assert ImageSettings.from_parameters(request.parameters()) == request
    assert "Denoising strength" not in ImageSettings("a cat").parameters()


def test_bad_editing_input_gets_a_clear_error(pipe, tmp_path):
    image = Image.new("RGB", (32, 32), "white")
    with pytest.raises(UnnoiseError, match=r"mask is 16x16 but the image is 32x32"):
        pipe.inpaint(image, Image.new("L", (16, 16)), "x")
    with pytest.raises(UnnoiseError, match=r"denoising strength must be in \[0, 1\], got 1.5"):
        pipe.edit(image, "x", strength=1.5)
    with pytest.raises(UnnoiseError, match=r"denoising strength must be in \[0, 1\], got -0.1"):
        pipe.inpaint(image, image, "x", strength=-0.1)
    with pytest.raises(UnnoiseError, match="denoising strength must be a finite number, got nan"):
        pipe.edit(image, "x", strength=float("nan"))
    with pytest.raises(UnnoiseError, match="variation strength must be"):
        pipe.generate("x", variation_seed=1, variation_strength=2.0)
    with pytest.raises(UnnoiseError, match=r"seed must be in 0\.\."):
        pipe.generate("x", seed=2**70)
    with pytest.raises(UnnoiseError, match="has no option eta"):
        pipe.edit(image, "x", sampler="dpmpp_2m", sampler_options={"eta": 0.5})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UnnoiseError, match=r"cannot read the image .*broken\.png"):
        pipe.edit(tmp_path / "broken.png", "x")
    with pytest.raises(UnnoiseError, match=r"cannot read the mask .*missing\.png"):
        pipe.inpaint(image, tmp_path / "missing.png", "x")
    with pytest.raises(UnnoiseError, match="area must be 'whole' or 'masked', got 'all'"):
        pipe.inpaint(image, image, "x", area="all")
    with pytest.raises(UnnoiseError, match="needs to_prompt, to_seed or both"):
        pipe.interpolate("x")


def test_every_editing_method_takes_the_samplers_options(pipe):
    """Issue 12: edit and inpaint raised TypeError for eta, which generate accepted."""
    image = Image.new("RGB", (32, 32), "white")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 20, 20))
    options = dict(sampler="ddim", sampler_options={"eta": 0.5}, steps=4, seed=1)
    for images in (
        pipe.generate("x", **options),
        pipe.edit(image, "x", strength=0.5, **options),
        pipe.inpaint(image, mask, "x", resample=1, **options),
    ):
        assert "Eta: 0.5" in images[0].info["parameters"]
        assert ImageSettings.from_parameters(images[0].info["parameters"]).sampler_options == {"eta": 0.5}


def test_inpainting_at_strength_zero_returns_the_input(pipe):
    """Issue 12: inpaint(strength=0, resample=1) failed inside the schedule instead of running no step."""
    image = Image.effect_noise((32, 32), 60).convert("RGB")
    mask = Image.new("L", (32, 32), 255)
    for resample in (1, 5):
        out = pipe.inpaint(image, mask, "x", strength=0, resample=resample, steps=4)[0]
        assert np.array_equal(np.asarray(out), np.asarray(image))


A1111_TEXT = (
    "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7,"
    " Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.10.1"
)


def test_png_text_speaks_automatic1111s_sampler_names_and_reads_its_pngs():
    """Issue 13: our PNGs named samplers in our spelling, without a schedule type or a model hash."""
    settings = ImageSettings(
        "a dog", sampler="euler_ancestral", seed=3, width=32, height=32, model_hash="abc", schedule="Karras"
    )
    text = settings.parameters()
    assert "Sampler: Euler a, Schedule type: Karras" in text and "Model hash: abc" in text
    assert ImageSettings.from_parameters(text) == settings
    theirs = ImageSettings.from_parameters(A1111_TEXT)
    assert (theirs.sampler, theirs.guidance, theirs.seed, theirs.model_hash) == (
        "dpmpp_2m",
        7.0,
        1234,
        "6ce0161689",
    )
    older = ImageSettings.from_parameters(
        A1111_TEXT.replace("DPM++ 2M, Schedule type: Karras", "DPM++ 2M Karras")
    )
    assert older.sampler == "dpmpp_2m"
    assert (
        ImageSettings.from_parameters(A1111_TEXT.replace("Karras", "Exponential")).schedule == "Exponential"
    )
    with pytest.raises(UnnoiseError, match="'Polyexponential' schedule"):
        ImageSettings.from_parameters(A1111_TEXT.replace("Karras", "Polyexponential"))
    assert ImageSettings("x", sampler="pc").parameters().count("Sampler: pc,") == 1  # no A1111 label: ours


# --- masked content: what the regenerated part starts from (AUTOMATIC1111's inpainting_fill) -------------


def halves() -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 3, 8, 8) image, red on the left half and blue on the right with a green square in the middle,
    and a hole over columns 2..5."""
    image = torch.zeros(1, 3, 8, 8)
    image[:, 0, :, :4], image[:, 2, :, 4:] = 1.0, 1.0
    image[:, :, 2:6, 2:6] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6] = 1
    return image, mask


def test_masked_content_changes_the_hole_only():
    image, mask = halves()
    hole = mask.bool().expand_as(image)
    assert torch.equal(masked_start(image, mask, "original"), image)
    for content in ("fill", "noise", "nothing"):
        start = masked_start(image, mask, content, torch.Generator().manual_seed(0))
        assert torch.equal(start[~hole], image[~hole]), content
        assert not torch.equal(start[hole], image[hole]), content
    assert torch.all(masked_start(image, mask, "nothing")[hole] == 0)
    noise = masked_start(image, mask, "noise", torch.Generator().manual_seed(0))[hole]
    assert 0.7 < float(noise.std()) < 1.3
    with pytest.raises(UnnoiseError, match="unknown masked content 'blur'"):
        masked_start(image, mask, "blur")


def test_fill_spreads_the_nearest_colours_into_the_hole():
    image, mask = halves()
    filled = masked_start(image, mask, "fill")
    assert torch.allclose(filled[0, :, :, 2], torch.tensor([1.0, 0, 0])[:, None].expand(3, 8))  # next to red
    assert torch.allclose(filled[0, :, :, 5], torch.tensor([0, 0, 1.0])[:, None].expand(3, 8))  # next to blue
    assert float(filled[0, 0, 0, 3]) > float(filled[0, 2, 0, 3])  # nearer red than blue
    everything = masked_start(image, torch.ones(1, 1, 8, 8), "fill")
    assert torch.all(everything == 0)  # nothing known: flat grey


def test_inpainting_below_strength_one_starts_from_the_masked_content(pipe):
    image = Image.fromarray(np.full((32, 32, 3), (220, 40, 40), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    results = {
        content: np.asarray(
            pipe.inpaint(
                image,
                mask,
                "a blue square",
                strength=0.5,
                resample=1,
                steps=4,
                seed=3,
                masked_content=content,
            )[0]
        )
        for content in ("original", "fill", "noise", "nothing")
    }
    assert not np.array_equal(results["original"], results["noise"])
    assert not np.array_equal(results["noise"], results["nothing"])
    for result in results.values():
        assert np.array_equal(result[:8], np.asarray(image)[:8])  # outside the mask: the input exactly
    assert (
        "Masked content: noise"
        in pipe.inpaint(image, mask, "x", strength=0.5, resample=1, steps=2, masked_content="noise")[0].info[
            "parameters"
        ]
    )


# --- issue 31: hostile files given to the CLI and the library ---------------------------------------------


def text_bomb_png(path, chunks: int = 62) -> None:
    """An 8x8 PNG with `chunks` zTXt chunks of 1 MB inflated each (about 84 KB on disk)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packed = zlib.compress(b"A" * 999_900, 9)
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + b"\0" * 24 for _ in range(8)))
    body = b"".join(chunk(b"zTXt", b"k%d\0\0" % i + packed) for i in range(chunks))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def test_a_png_of_inflating_text_chunks_is_refused_without_inflating_them(tmp_path):
    import tracemalloc

    from unnoise.images import open_image, read_png_text

    bomb = tmp_path / "bomb.png"
    text_bomb_png(bomb)
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    for read in (open_image, read_png_text):
        with pytest.raises(UnnoiseError, match="cannot read"):
            read(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000  # Pillow's own bounds let it hold 62 MB


def test_a_fifo_given_as_an_image_is_named_not_waited_on(tmp_path):
    import os

    from unnoise.images import open_image, open_mask, read_png_text

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for read in (open_image, open_mask, read_png_text):
        with pytest.raises(UnnoiseError, match="not a regular file"):
            read(fifo)
