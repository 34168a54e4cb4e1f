"""Issue 29: the image codec seam, unnoise's autoencoder, and latent diffusion end to end (tiny models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unnoise
from tests.conftest import run_cli, weights_of
from unnoise.codec import IdentityCodec, LatentStatistics, latent_size_mask, load_codec
from unnoise.data.split import concept_of, held_out_mask
from unnoise.errors import UnnoiseError
from unnoise.images import psnr, ssim
from unnoise.train.autoencoder import AutoencoderTrainConfig, train_autoencoder
from unnoise.train.config import TrainConfig
from unnoise.train.loop import train

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60), "yellow": (230, 210, 20)}


def captioned_folder(root: Path, size: int = 16, tones: bool = True) -> Path:
    """Small squares and discs of four colours on white, captioned; each with two 'skin tone' variants."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in ("square", "disc"):
            for variant, shade in (("", 0), (", light skin tone", 20), (", dark skin tone", -20)):
                if variant and not tones:
                    continue
                image = Image.new("RGB", (size, size), "white")
                pixels = np.array(image)
                fill = np.clip(np.array(rgb) + shade, 0, 255)
                yy, xx = np.mgrid[:size, :size]
                c = size / 2
                inside = (abs(yy - c) < size / 3) & (abs(xx - c) < size / 3)
                if shape == "disc":
                    inside = (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2
                pixels[inside] = fill
                name = f"{colour}-{shape}{variant.replace(', ', '-').replace(' ', '-')}.png"
                Image.fromarray(pixels).save(root / name)
                rows.append({"file_name": name, "text": f"a {colour} {shape}{variant}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return captioned_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def autoencoder(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae")
    config = AutoencoderTrainConfig(
        data=str(folder), preset="tiny", steps=4, batch_size=4, checkpoint_every=2, log_every=2, out=str(out)
    )
    return train_autoencoder(config)


@pytest.fixture(scope="module")
def latent_model(folder, autoencoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latent")
    config = TrainConfig(
        data=str(folder), preset="latent-tiny", autoencoder=str(autoencoder), batch_size=4, steps=2,
        checkpoint_every=2, sample_every=2, flip=True, out=str(out),
    )  # fmt: skip
    return train(config)


# --- the codec -------------------------------------------------------------------------------------------


def test_the_autoencoder_release_has_statistics_and_held_out_quality(autoencoder):
    config = json.loads((autoencoder / "config.json").read_text())
    assert config["format"] == "unnoise-autoencoder/1"
    assert len(config["latent_statistics"]["mean"]) == config["network"]["latent_channels"] == 4
    held = config["evaluation"]["held_out"]
    assert held["images"] > 0 and held["psnr"] > 0 and -1 <= held["ssim"] <= 1


def test_the_codec_encodes_to_unit_statistics_and_decodes_to_pixels(autoencoder, folder):
    codec = load_codec(autoencoder)
    assert (codec.factor, codec.channels) == (2, 4)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x)
        assert z.shape == (3, 4, 8, 8)
        y = codec.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_latent_statistics_make_the_training_latents_unit_variance():
    raw = torch.randn(50, 4, 8, 8) * torch.tensor([1.0, 2.0, 0.5, 3.0])[None, :, None, None] + 5
    stats = LatentStatistics.measure(raw)
    mean, std = stats.shaped(raw)
    z = (raw - mean) / std
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(4), atol=1e-3)


def test_a_mask_at_latent_size_covers_every_masked_pixel():
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[..., 5, 9] = True  # one pixel
    small = latent_size_mask(mask, 4)
    assert small.shape == (1, 1, 4, 4) and small.sum() == 1 and small[0, 0, 1, 2]
    assert latent_size_mask(mask, 1) is mask


def test_identity_codec_changes_nothing():
    x = torch.randn(2, 3, 8, 8)
    codec = IdentityCodec()
    assert codec.encode(x) is x and codec.decode(x) is x and codec.factor == 1


def test_metrics_order_the_obvious_cases():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
    noisier = (x + 0.4 * torch.randn_like(x)).clamp(-1, 1)
    assert psnr(x, x).min() > 100 and torch.allclose(ssim(x, x), torch.ones(4), atol=1e-4)
    assert (psnr(x, noisy) > psnr(x, noisier)).all() and (ssim(x, noisy) > ssim(x, noisier)).all()


def test_a_damaged_autoencoder_release_is_one_line(autoencoder, tmp_path):
    broken = tmp_path / "ae"
    shutil.copytree(autoencoder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["network"]["channels"] = 10**6
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnnoiseError, match="channels"):
        load_codec(broken)
    with pytest.raises(UnnoiseError, match="not an autoencoder release"):
        load_codec(Path(unnoise.__file__).parent / "models" / "shapes-32")


# --- the held-out split ----------------------------------------------------------------------------------


def test_variants_of_one_concept_fall_on_the_same_side():
    assert concept_of("handshake, medium-dark skin tone") == concept_of("handshake") == "handshake"
    assert concept_of("waving hand: light skin tone") == "waving hand"
    assert concept_of("kiss: woman, man, light skin tone, dark skin tone") == "kiss: woman, man"
    captions = [
        f"thing {n}{tone}" for n in range(200) for tone in ("", ", light skin tone", ", dark skin tone")
    ]
    held = held_out_mask(captions, 0.2)
    for n in range(200):
        assert held[3 * n] == held[3 * n + 1] == held[3 * n + 2]
    assert 0.1 < sum(held) / len(held) < 0.3
    assert held_out_mask(captions[::-1], 0.2) == held[::-1]  # a concept's side never depends on the others


# --- latent diffusion end to end -------------------------------------------------------------------------


def test_a_latent_release_carries_its_autoencoder_and_generates_pixels(latent_model):
    assert (latent_model / "autoencoder" / "config.json").is_file()
    config = json.loads((latent_model / "config.json").read_text())
    assert config["codec"] == {"kind": "autoencoder", "folder": "autoencoder"} and config["resolution"] == 16
    pipe = unnoise.load(latent_model)
    assert (pipe.resolution, pipe.codec.factor) == (16, 2)
    images = pipe.generate("a red square", steps=3, seed=1, num_images=2)
    assert [im.size for im in images] == [(16, 16)] * 2
    again = pipe.generate("a red square", steps=3, seed=2)[0]
    assert np.array_equal(np.asarray(again), np.asarray(images[1]))  # the seed promise, in latent space too


def test_latent_inpainting_keeps_every_unmasked_pixel_and_editing_works(latent_model, folder):
    pipe = unnoise.load(latent_model)
    source = Image.open(folder / "red-square.png").convert("RGB")
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (4, 4, 9, 9))
    result = pipe.inpaint(source, mask, "a blue square", steps=2, seed=0, resample=1)[0]
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(result)[outside], np.asarray(source)[outside])
    edited = pipe.edit(source, "a blue disc", strength=0.5, steps=2, seed=0)[0]
    assert edited.size == source.size
    frames = pipe.interpolate("a red square", to_prompt="a blue disc", seed=0, frames=2, steps=2)
    assert len(frames) == 2


def test_previews_decode_the_estimate(latent_model):
    pipe = unnoise.load(latent_model)
    seen = []
    pipe.generate(
        "a red square", steps=2, seed=0, callback=lambda step: seen.append(pipe.preview(step.denoised))
    )
    assert seen and seen[0].size == (16, 16)


def test_a_latent_release_without_its_autoencoder_says_what_is_missing(latent_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(latent_model, copy)
    shutil.rmtree(copy / "autoencoder")
    with pytest.raises(UnnoiseError, match="autoencoder is missing"):
        unnoise.load(copy)


def test_an_autoencoder_of_another_resolution_is_refused(folder, autoencoder, tmp_path):
    config = TrainConfig(
        data=str(folder), preset="latent-tiny", autoencoder=str(autoencoder), resolution=32, steps=1,
        batch_size=4, out=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(UnnoiseError, match="trained at 16x16"):
        train(config)


def test_a_damaged_latent_cache_is_encoded_again(folder, autoencoder, latent_model, tmp_path, caplog):
    run = latent_model.parent
    cache = run / "latents.safetensors"
    assert cache.is_file()
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    config = TrainConfig.load(run / "config.json")
    config.steps = 3
    with caplog.at_level("INFO", logger="unnoise.train"):
        train(config, resume=True)
    assert "is damaged" in caplog.text and cache.stat().st_size > 100


def test_the_cli_trains_an_autoencoder(folder, tmp_path, caplog):
    with caplog.at_level("INFO", logger="unnoise.train"):
        done = run_cli(
        "train-autoencoder", "--data", str(folder), "--preset", "tiny", "--steps", "2", "--batch-size", "4",
            "--checkpoint-every", "2", "--out", str(tmp_path / "ae"),
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resolution 16: every image" in caplog.text
    again = run_cli(
        "train-autoencoder", "--data", str(folder), "--preset", "tiny", "--out", str(tmp_path / "ae")
    )
    assert again.returncode == 2 and "--resume" in again.stderr


def test_a_second_trainer_on_a_run_folder_is_refused_and_touches_nothing(folder, tmp_path):
    """Issue 31: two `--resume`s on one folder both trained; now the second is refused, naming the first."""
    from unnoise.train.checkpoint import RunLock

    out = tmp_path / "run"
    config = TrainConfig(data=str(folder), preset="latent-tiny", steps=1, batch_size=4, out=str(out))
    ae = AutoencoderTrainConfig(data=str(folder), preset="tiny", steps=1, batch_size=4, out=str(out))
    with RunLock(out):
        before = sorted(p.name for p in out.iterdir())
        for start in (
            lambda: train(config),
            lambda: train(config, resume=True),
            lambda: train_autoencoder(ae),
        ):
            with pytest.raises(UnnoiseError, match=r"in use by another training \(PID \d+\)"):
                start()
        assert sorted(p.name for p in out.iterdir()) == before
    train_autoencoder(ae)  # the lock went with its holder


def test_a_folder_of_mixed_sizes_trains_at_the_common_short_side_and_says_the_counts(tmp_path):
    from unnoise.data.folder import folder_resolution

    root = tmp_path / "mixed"
    root.mkdir()
    sizes = [(24, 24)] * 3 + [(40, 32)] * 2 + [(16, 16)]
    for i, size in enumerate(sizes):
        Image.new("LA" if i % 2 else "RGBA", size, 128).save(root / f"{i}.png")  # grey and transparent too
        (root / f"{i}.txt").write_text(f"picture {i}")
    said = []
    assert folder_resolution(root, say=said.append) == 24
    assert "3 at 24x24, 2 at 40x32, 1 at 16x16" in said[0] and "--resolution" in said[0]


@pytest.mark.parametrize("damage", ["truncated", "pickle", "ckpt-only", "oversized"])
def test_a_latent_release_with_a_hostile_autoencoder_is_one_line(damage, latent_model, tmp_path):
    """Issue 31's probes of the new file kinds: an autoencoder whose weights are cut short, a pickle in a
    .safetensors name, only a .ckpt, or a config that would allocate far more than its weights hold: each
    refused by `unnoise generate` with one line (exit 2, a user error), nothing unpickled, no traceback."""
    import pickle

    release = Path(shutil.copytree(latent_model, tmp_path / "release"))
    weights = weights_of(release / "autoencoder")
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "pickle":
        weights.write_bytes(pickle.dumps({"weight": [1.0] * 10}))
    elif damage == "ckpt-only":
        weights.rename(weights.with_suffix(".ckpt"))
    else:
        config = json.loads((release / "autoencoder" / "config.json").read_text())
        config["network"]["channels"] = 4096  # within the field's range, far beyond the weights
        (release / "autoencoder" / "config.json").write_text(json.dumps(config))
    out = str(tmp_path / "out")
    done = run_cli("generate", "a red square", "--model", str(release), "--steps", "1", "--out", out)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
