"""Issue 29, point 5: the folder evaluation's metrics rank known cases in the obvious order, and the
command runs end to end on a tiny model and folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.test_latent import autoencoder, captioned_folder, folder, latent_model  # noqa: F401  (fixtures)
from unnoise.codec import IdentityCodec
from unnoise.eval.folder_eval import (
    Judge,
    codec_report,
    derangement,
    frechet_distance,
    kernel_inception_distance,
    manifold_metrics,
    near_copies,
    split_folder,
    train_judge,
)
from unnoise.text.encoders import load_text_encoder


@pytest.fixture(scope="module")
def features():
    """Real features: 300 points around 10 centres; a slightly blurred copy; and noise of the same scale."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16)) * 3
    real = centres[rng.integers(0, 10, 300)] + rng.normal(size=(300, 16))
    other = centres[rng.integers(0, 10, 300)] + rng.normal(size=(300, 16))  # a fresh draw of the same data
    blurred = 0.7 * other + 0.3 * other.mean(0)  # pulled towards the mean: less varied
    noise = rng.normal(size=(300, 16)) * real.std()
    return real, other, blurred, noise


def test_frechet_distance_and_kid_rank_the_same_data_then_blur_then_noise(features):
    real, other, blurred, noise = features
    fd = [frechet_distance(real, x) for x in (other, blurred, noise)]
    kid = [kernel_inception_distance(real, x) for x in (other, blurred, noise)]
    assert fd[0] < fd[1] < fd[2] and kid[0] < kid[1] < kid[2]
    assert abs(frechet_distance(real, real)) < 1e-6 and abs(kid[0]) < 0.1 * kid[2]


def test_precision_recall_density_coverage_rank_them_too(features):
    real, other, _, noise = features
    same, bad = manifold_metrics(real, other), manifold_metrics(real, noise)
    for name in ("precision", "recall", "density", "coverage"):
        assert same[name] > bad[name], name
    assert same["precision"] > 0.8 and same["coverage"] > 0.8 and bad["precision"] < 0.5


def test_near_copies_find_the_training_images_themselves_and_not_fresh_ones(features):
    real, _, _, noise = features
    concepts = [str(i) for i in range(len(real))]  # each image its own concept
    assert near_copies(real, real, concepts) == 1.0
    assert near_copies(noise, real, concepts) < 0.1
    assert near_copies(real + 1e-3, real, concepts) == 1.0


def test_a_derangement_moves_every_caption():
    for n in (2, 3, 10, 57):
        d = derangement(n, seed=1)
        assert sorted(d) == list(range(n)) and all(d[i] != i for i in range(n))


def test_the_judge_scores_images_with_their_own_captions_above_shuffled_ones(tmp_path):
    root = captioned_folder(tmp_path / "f", tones=False)
    split = split_folder(root, 16, held_out=0.3, seed=3)
    pixels = torch.cat([split.train_pixels, split.held_pixels])
    captions = split.train_captions + split.held_captions
    pooled = load_text_encoder("minilm", max_tokens=32).encode(captions).pooled
    judge = train_judge(pixels, pooled, captions, steps=150, seed=0, say=lambda _: None)
    with torch.no_grad():
        images = judge.image(pixels.float() / 127.5 - 1)
        text = judge.embed_text(pooled)
    own = (images * text).sum(1).mean()
    shuffled = (images * text[derangement(len(captions), 0)]).sum(1).mean()
    assert own > shuffled + 0.2


def test_eval_folder_runs_on_a_latent_model(latent_model, folder, tmp_path):  # noqa: F811
    report_path = tmp_path / "report.json"
    done = run_cli(
        "eval", "folder", "--model", str(latent_model), "--data", str(folder), "--held-out", "0.3",
        "--captions", "6", "--steps", "2", "--judge-steps", "20", "--report", str(report_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    for side in ("train", "held_out"):
        assert set(report[side]["text_alignment"]) == {"model", "ceiling", "floor", "fraction"}
        assert 0 <= report[side]["near_copies"] <= 1
    assert "text alignment" in done.stdout
    assert report["autoencoder"]["images"] == report["split"]["held_out_images"]
    assert "autoencoder:" in done.stdout


class NoisyCodec(IdentityCodec):
    """Decodes with a fixed amount of noise added: a worse reconstruction than the identity's."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z + 0.2 * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))


def test_the_codec_report_ranks_a_perfect_codec_above_a_noisy_one_and_both_against_blur(tmp_path):
    root = captioned_folder(tmp_path / "f", tones=False)
    pixels = split_folder(root, 16, held_out=0.3, seed=3).held_pixels
    torch.manual_seed(0)
    judge = Judge().eval()
    exact, noisy = codec_report(judge, IdentityCodec(), pixels), codec_report(judge, NoisyCodec(), pixels)
    assert exact["psnr"] > 60 and exact["ssim"] > 0.999 and exact["fd"] < 1e-6 < exact["fd_blurred_control"]
    assert noisy["psnr"] < 30 and noisy["ssim"] < exact["ssim"] and noisy["fd"] > exact["fd"]


def test_a_torchrun_launch_shards_the_folder_generations_into_the_single_process_report(
    latent_model, folder, tmp_path  # noqa: F811
):  # fmt: skip
    """Issue 30 item 5: two processes draw every other image and gather them; the report is the single
    process's, number for number (both at one thread, where each image is bit for bit the same)."""
    from tests.conftest import reports_alone_and_under_torchrun

    args = ["eval", "folder", "--model", str(latent_model), "--data", str(folder), "--held-out", "0.3",
            "--captions", "6", "--steps", "2", "--judge-steps", "20", "--device", "cpu"]  # fmt: skip
    alone, shared = reports_alone_and_under_torchrun(args, tmp_path)
    assert shared == alone
