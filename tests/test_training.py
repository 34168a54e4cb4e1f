"""Training: a killed run resumes to the same weights, damaged checkpoints are skipped, NaN steps are
skipped and then stop the run, and two DDP processes compute the single process's gradients."""

import errno
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from tests.conftest import weights_of
from unnoise.errors import UnnoiseError
from unnoise.release import load_release, weights_path
from unnoise.train.checkpoint import latest_good_state, list_states, load_training_state
from unnoise.train.config import TrainConfig
from unnoise.train.distributed import init_distributed
from unnoise.train.loop import Run, learning_rate, train

from .conftest import run_cli

TESTS = Path(__file__).resolve().parent
TINY = [
    "--preset",
    "tiny",
    "--batch-size",
    "4",
    "--log-every",
    "1",
    "--checkpoint-every",
    "2",
    "--sample-every",
    "0",
    "--warmup-steps",
    "2",
]


def cli(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "unnoise", "train", *TINY, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_training_state(list_states(run_dir)[0])["model"]


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli("--steps", "8", "--out", str(straight)).wait(timeout=300) == 0

    process = cli("--steps", "8", "--out", str(killed))
    deadline = time.time() + 240
    while not (killed / "state-00000004").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list_states(killed), "the run was killed before its first checkpoint"

    resumed = cli("--steps", "8", "--out", str(killed), "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from step" in output
    expected, got = final_weights(straight), final_weights(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    train(
        TrainConfig(
            preset="tiny", batch_size=4, steps=4, checkpoint_every=2, sample_every=0, out=str(tmp_path)
        )
    )
    newest, previous = list_states(tmp_path)[:2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    messages = []
    state = latest_good_state(tmp_path, report=messages.append)
    assert state["step"] == 2 and previous.name.endswith("00000002")
    assert "skipping damaged checkpoint" in messages[0] and "model.safetensors" in messages[0]


@pytest.mark.parametrize(
    "edit, reason",
    [
        (lambda meta: meta.pop("extra"), "lacks extra"),
        (lambda meta: meta["sha256"].pop("ema.safetensors"), "does not give a checksum"),
        (lambda meta: meta.update(step=1000), "says step 1000"),
    ],
)
def test_a_state_json_that_parses_but_is_wrong_falls_back_too(tmp_path, edit, reason):
    """Issue 12: a renamed key or a missing checksum was a KeyError, an edited step was followed."""
    train(
        TrainConfig(
            preset="tiny", batch_size=4, steps=4, checkpoint_every=2, sample_every=0, out=str(tmp_path)
        )
    )
    newest = list_states(tmp_path)[0] / "state.json"
    meta = json.loads(newest.read_text())
    edit(meta)
    newest.write_text(json.dumps(meta))
    messages = []
    assert latest_good_state(tmp_path, report=messages.append)["step"] == 2
    assert reason in messages[0]


def test_a_kill_at_any_rename_of_a_release_write_leaves_a_release_that_loads(tmp_path, monkeypatch):
    """Issue 31 item 7: the weights go to a file named by their checksum and one rename of config.json
    switches the release, so a kill before it leaves the old release whole, after it the new one; weights
    no config names are removed, but for the previous release's."""
    import os

    from unnoise.release import save_release

    network = torch.nn.Linear(3, 2)
    save_release(tmp_path, network, {"training": {"steps": 1}}, dtype=torch.float32)
    first = weights_path(tmp_path, load_release(tmp_path)[1]).name
    real_replace = os.replace
    for kill_at in range(2):  # the weights' rename, then the config's
        renames = []

        def killed(source, target, renames=renames, kill_at=kill_at):
            if len(renames) == kill_at:
                raise KeyboardInterrupt  # as a kill between two renames: nothing after it runs
            renames.append(target)
            real_replace(source, target)

        monkeypatch.setattr(os, "replace", killed)
        with torch.no_grad():
            network.weight.add_(1.0)
        with pytest.raises(KeyboardInterrupt):
            save_release(tmp_path, network, {"training": {"steps": 2}}, dtype=torch.float32)
        monkeypatch.setattr(os, "replace", real_replace)
        _, config = load_release(tmp_path)  # checksum verified: the old release, whole
        assert config["training"]["steps"] == 1 and weights_path(tmp_path, config).name == first
    for steps in (3, 4):
        save_release(tmp_path, network, {"training": {"steps": steps}}, dtype=torch.float32)
        with torch.no_grad():
            network.weight.add_(1.0)
    names = sorted(p.name for p in tmp_path.glob("model*.safetensors"))
    assert load_release(tmp_path)[1]["training"]["steps"] == 4 and len(names) == 2, names


def test_resume_repairs_a_stale_release_and_removes_temporaries(tmp_path, caplog):
    """Issue 12: a kill during the final release write left model/ a checkpoint behind for good."""
    config = dict(preset="tiny", batch_size=4, checkpoint_every=2, sample_every=0, out=str(tmp_path))
    train(TrainConfig(steps=2, **config))
    stale = (tmp_path / "model" / "config.json").read_text()
    stale_name = weights_path(tmp_path / "model", json.loads(stale)).name
    stale_weights = (tmp_path / "model" / stale_name).read_bytes()
    train(TrainConfig(steps=4, **config), resume=True)
    # as if killed after state-00000004 was renamed into place but before model/ was rewritten
    (tmp_path / "model" / "config.json").write_text(stale)
    (tmp_path / "model" / stale_name).write_bytes(stale_weights)
    (tmp_path / ".tmp-state-00000006-123").mkdir()
    (tmp_path / "model" / ".tmp-model-123.safetensors").write_bytes(b"half")
    caplog.set_level(logging.INFO, logger="unnoise.train")
    train(TrainConfig(steps=4, **config), resume=True)
    assert any("was at step 2" in m for m in caplog.messages), caplog.messages
    _, release = load_release(tmp_path / "model")
    assert release["training"]["steps"] == 4
    assert not list(tmp_path.glob(".tmp-*")) and not list((tmp_path / "model").glob(".tmp-*"))


@pytest.mark.parametrize(
    "failing_write, error, kept",
    [
        (
            6,
            SafetensorError("Error while serializing: No space left on device"),
            "previous checkpoint is kept",
        ),
        (6, OSError(errno.ENOSPC, "No space left on device"), "previous checkpoint is kept"),
        (8, SafetensorError("Error while serializing: No space left on device"), "the previous one is kept"),
        (8, OSError(errno.ENOSPC, "No space left on device"), "the previous one is kept"),
    ],
    ids=["state-safetensors", "state-enospc", "release-safetensors", "release-enospc"],
)
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(
    tmp_path, monkeypatch, failing_write, error, kept
):
    """Issue 12: safetensors' SafetensorError (a full disk) was a traceback. Each checkpoint writes four
    safetensors files: state-N/'s model, ema and optimizer, then model/'s weights; write 6 is step 4's
    EMA, write 8 step 4's release."""
    import unnoise.release

    real_save_file, writes = unnoise.release.save_file, []

    def disk_full_at_one_write(tensors, path):
        writes.append(path)
        if len(writes) == failing_write:
            Path(path).write_bytes(b"half")  # what a full disk leaves behind
            raise error
        real_save_file(tensors, path)

    monkeypatch.setattr(unnoise.release, "save_file", disk_full_at_one_write)
    result = run_cli("train", *TINY, "--steps", "4", "--out", str(tmp_path))
    message = result.stderr.split("unnoise: error: ")[-1]  # after the progress bar
    assert result.returncode == 1 and message.count("\n") == 1 and "Traceback" not in result.stderr, message
    assert str(tmp_path) in message and kept in message, message
    assert not list(tmp_path.rglob(".tmp-*"))
    _, release = load_release(tmp_path / "model")  # whole, at the previous checkpoint
    assert release["training"]["steps"] == 2
    states = [state.name for state in list_states(tmp_path)]
    assert states == (["state-00000002"] if failing_write == 6 else ["state-00000004", "state-00000002"])

    monkeypatch.setattr(unnoise.release, "save_file", real_save_file)
    assert run_cli("train", "--steps", "4", "--out", str(tmp_path), "--resume").returncode == 0
    assert load_release(tmp_path / "model")[1]["training"]["steps"] == 4


def test_a_full_disk_at_the_first_checkpoint_does_not_promise_an_earlier_one(tmp_path, monkeypatch):
    """Issue 31: the message said "the previous checkpoint is kept" when there was none."""
    import unnoise.release

    def disk_full(tensors, path):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(unnoise.release, "save_file", disk_full)
    result = run_cli("train", *TINY, "--steps", "2", "--out", str(tmp_path))
    assert result.returncode == 1 and "there is no earlier checkpoint" in result.stderr, result.stderr
    assert "previous checkpoint is kept" not in result.stderr and not list(tmp_path.rglob(".tmp-*"))


def test_the_release_loads_without_training_code_and_detects_tampering(tmp_path):
    train(
        TrainConfig(
            preset="tiny", batch_size=4, steps=2, checkpoint_every=2, sample_every=2, out=str(tmp_path)
        )
    )
    _, config = load_release(tmp_path / "model")
    assert config["network"]["kind"] == "unet" and config["network"]["channels"] == 32
    assert config["formulation"] == "edm" and config["text_encoder"]["token_layers"] == "last"
    assert (tmp_path / "samples" / "step-00000002.png").exists()
    assert (tmp_path / "config.json").exists() and (tmp_path / "log.csv").read_text().count("\n") == 2
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    blob = bytearray(weights_of(tmp_path / "model").read_bytes())
    blob[-10] ^= 0xFF
    weights_of(tmp_path / "model").write_bytes(bytes(blob))
    with pytest.raises(UnnoiseError, match="checksum"):
        load_release(tmp_path / "model")


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch, caplog):
    real, calls = Run.micro_batch_loss, []

    def nan_from_step_3(self, batch):
        calls.append(batch)  # one micro-batch a step: call k is step k
        loss = real(self, batch)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setattr(Run, "micro_batch_loss", nan_from_step_3)
    config = TrainConfig(
        preset="tiny",
        batch_size=4,
        steps=20,
        checkpoint_every=2,
        sample_every=0,
        max_bad_steps=4,
        out=str(tmp_path),
    )
    with pytest.raises(UnnoiseError, match="training diverged: 4 non-finite losses in a row at step 6"):
        train(config)
    skipped = [r for r in caplog.records if "step skipped" in r.message]
    assert len(skipped) == 4 and all(r.levelno == logging.WARNING for r in skipped)
    assert latest_good_state(tmp_path)["step"] == 2


def test_a_step_with_a_non_finite_loss_changes_nothing(tmp_path, monkeypatch):
    config = TrainConfig(
        preset="tiny", batch_size=4, steps=4, warmup_steps=0, sample_every=0, out=str(tmp_path)
    )
    run = Run(config, init_distributed("cpu"))
    batches = run.micro_batches(0)
    assert run.step(batches, 0).finite  # AdamW has state from here on

    def snapshot() -> list[torch.Tensor]:  # the weights, the EMA weights and AdamW's first moments
        ema, moments = run.ema.module.parameters(), (s["exp_avg"] for s in run.optimizer.state.values())
        return [t.detach().clone() for t in (*run.network.parameters(), *ema, *moments)]

    before = snapshot()
    real = Run.micro_batch_loss
    monkeypatch.setattr(Run, "micro_batch_loss", lambda self, batch: real(self, batch) * float("nan"))
    skipped = run.step(batches, 1)
    assert not skipped.finite and math.isnan(skipped.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))
    assert all(p.grad is None for p in run.network.parameters())

    monkeypatch.setattr(Run, "micro_batch_loss", real)
    taken = run.step(batches, 2)
    assert taken.finite and taken.lr == learning_rate(config, 2) and taken.grad_norm > 0
    changed = [not torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True)]
    n = len(changed) // 3  # weights, EMA weights, moments; zero-initialised layers keep some at 0 early on
    assert any(changed[:n]) and any(changed[n : 2 * n]) and any(changed[2 * n :])


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    config = TrainConfig(
        preset="tiny", batch_size=4, steps=2, checkpoint_every=2, sample_every=0, out=str(tmp_path)
    )
    train(config)
    with pytest.raises(UnnoiseError, match="--resume"):
        train(config)


def test_bad_options_are_named(tmp_path):
    with pytest.raises(UnnoiseError, match="does not split"):
        train(TrainConfig(preset="tiny", batch_size=6, grad_accumulation=4, out=str(tmp_path)))
    with pytest.raises(UnnoiseError, match="unknown preset"):
        train(TrainConfig(preset="huge", out=str(tmp_path / "b")))
    with pytest.raises(UnnoiseError, match="no such folder"):
        train(TrainConfig(preset="tiny", data=str(tmp_path / "missing"), out=str(tmp_path / "c")))
    with pytest.raises(UnnoiseError, match="'single' is not name=number"):
        TrainConfig(shapes_mix="single").validate()
    with pytest.raises(UnnoiseError, match="--shapes-mix is for the built-in data set"):
        TrainConfig(data=str(tmp_path), shapes_mix="single=1").validate()


def test_training_on_a_folder_of_captioned_images(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGBA", (40, 30), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {colour} picture")
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("a broken file")
    caplog.set_level(logging.INFO, logger="unnoise.train")
    train(
        TrainConfig(
            preset="tiny",
            data=str(data),
            batch_size=4,
            steps=2,
            checkpoint_every=2,
            sample_every=2,
            flip=True,
            out=str(tmp_path / "run"),
        ),
    )
    assert "resolution 30: every image" in caplog.messages[0]  # 40x30: the short side, by default
    scan = next(m for m in caplog.messages if "usable" in m)
    assert "3 usable" in scan and "not an image" in scan
    assert weights_of(tmp_path / "run" / "model").exists()


def test_two_ddp_processes_and_two_nodes_compute_the_single_process_gradients(tmp_path):
    from tests.test_server import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "single.safetensors", tmp_path / "double.safetensors"
    subprocess.run(
        [sys.executable, str(TESTS / "ddp_gradients.py"), str(single)], check=True, env=env, timeout=300
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(TESTS / "ddp_gradients.py"),
            str(double),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    # issue 30: two "nodes" on this machine, two torchrun launches on one rendezvous (gloo), as a
    # multi-machine run is launched (docs/training.md)
    nodes = tmp_path / "nodes.safetensors"
    port = str(free_port())

    def node(rank: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
                   str(TESTS / "ddp_gradients.py"), str(nodes)]  # fmt: skip
        return subprocess.Popen(command, env=env)

    launches = [node(0), node(1)]
    assert [launch.wait(timeout=300) for launch in launches] == [0, 0]
    expected = load_file(str(single))
    assert len(expected) > 50
    for got in (load_file(str(double)), load_file(str(nodes))):
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def gradients(config: TrainConfig) -> dict[str, torch.Tensor]:
    from unnoise.train.distributed import init_distributed

    run = Run(config, init_distributed("cpu"), log=lambda *_: None)
    run.backward(run.micro_batches(1))
    return {name: p.grad.clone() for name, p in run.network.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_the_whole_batch():
    whole = gradients(TrainConfig(preset="tiny", batch_size=8, precision="fp32"))
    accumulated = gradients(TrainConfig(preset="tiny", batch_size=8, grad_accumulation=4, precision="fp32"))
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_min_snr_weighting_caps_the_weight_of_low_noise():
    from unnoise.diffusion.denoiser import min_snr_weight

    sigma = torch.tensor([0.01, 0.1, 1.0, 10.0])
    torch.testing.assert_close(min_snr_weight(sigma, gamma=5.0), torch.tensor([5.0, 5.0, 1.0, 0.01]))
    config = TrainConfig(preset="tiny", batch_size=4, precision="fp32", loss_weighting="min_snr")
    assert all(torch.isfinite(g).all() for g in gradients(config).values())


@pytest.mark.slow
def test_compiled_training_runs(tmp_path):
    train(
        TrainConfig(
            preset="tiny",
            batch_size=4,
            steps=2,
            checkpoint_every=2,
            sample_every=0,
            compile=True,
            out=str(tmp_path),
        )
    )
    assert weights_of(tmp_path / "model").exists()


def test_optimizer_state_is_restored_in_its_parameters_layout():
    """Fused AdamW computes wrong updates if a moment is laid out unlike its (channels-last) parameter."""
    from unnoise.train.checkpoint import load_optimizer_state, optimizer_from_safe, optimizer_to_safe

    def fresh():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        return conv, torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True)

    def step(conv, optimizer, seed):
        x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
        conv(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    straight, straight_optimizer = fresh()
    resumed, resumed_optimizer = fresh()
    for seed in range(2):
        step(straight, straight_optimizer, seed)
        step(resumed, resumed_optimizer, seed)
    tensors, meta = optimizer_to_safe(resumed_optimizer.state_dict())
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=0.1, fused=True)
    load_optimizer_state(
        resumed_optimizer, optimizer_from_safe({k: v.contiguous() for k, v in tensors.items()}, meta)
    )
    step(straight, straight_optimizer, 2)
    step(resumed, resumed_optimizer, 2)
    torch.testing.assert_close(resumed.weight, straight.weight, rtol=0, atol=0)


@pytest.mark.parametrize("formulation", ["edm", "vp", "ddpm", "ve", "flow"])
def test_every_formulation_trains(formulation):
    grads = gradients(TrainConfig(preset="tiny", batch_size=4, formulation=formulation, precision="fp32"))
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


def test_ema_half_life_is_counted_in_images():
    from unnoise.train.ema import ema_decay

    beta = ema_decay(batch_images=64, images_seen=10**9, half_life=6400, warmup=0.1)
    assert beta**100 == pytest.approx(0.5)  # 100 steps of 64 images = one half-life
    assert ema_decay(batch_images=64, images_seen=640, half_life=6400, warmup=0.1) == pytest.approx(0.5)


def test_resume_keeps_the_runs_own_settings_and_refuses_a_different_model(tmp_path):
    train(
        TrainConfig(
            preset="tiny", batch_size=4, steps=2, checkpoint_every=2, sample_every=0, out=str(tmp_path)
        )
    )
    more = subprocess.run(
        [sys.executable, "-m", "unnoise", "train", "--out", str(tmp_path), "--resume", "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert more.returncode == 0, more.stderr
    assert (tmp_path / "state-00000004").is_dir() and "tiny unet" in more.stdout
    other = subprocess.run(
        [
            sys.executable,
            "-m",
            "unnoise",
            "train",
            "--out",
            str(tmp_path),
            "--resume",
            "--steps",
            "6",
            "--preset",
            "large",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 2 and "does not fit this model" in other.stderr, other.stderr
    # the refused resume left the run's own config.json, so a plain --resume still works (issue 13)
    assert json.loads((tmp_path / "config.json").read_text())["preset"] == "tiny"


def test_data_workers_make_the_same_batches_as_the_training_process():
    config = TrainConfig(preset="tiny", batch_size=4, grad_accumulation=2, steps=5, precision="fp32")
    from unnoise.train.distributed import init_distributed

    run = Run(config, init_distributed("cpu"), log=lambda *_: None)
    inline = list(run.micro_batches(2))
    run.config = TrainConfig(**{**config.__dict__, "data_workers": 2})
    ahead = list(run.micro_batches(2))
    assert len(inline) == len(ahead) == 6  # steps 2, 3, 4 x 2 micro-batches
    for a, b in zip(inline, ahead, strict=True):
        assert a.captions == b.captions
        for name in ("images", "sigma", "noise"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)


def test_learning_rate_warms_up_holds_then_decays_to_zero():
    from unnoise.train.loop import learning_rate

    config = TrainConfig(lr=1e-3, warmup_steps=10, steps=100, lr_decay_fraction=0.2)
    rates = [learning_rate(config, s) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[50] == rates[79] == pytest.approx(1e-3)
    assert rates[80] == pytest.approx(1e-3) and rates[90] == pytest.approx(5e-4)
    assert rates[99] == pytest.approx(5e-5) and all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert learning_rate(TrainConfig(lr=1e-3, warmup_steps=1, steps=10), 9) == 1e-3  # no decay: constant


def test_the_linear_and_cosine_schedules_fall_from_the_peak_to_zero_after_the_warm_up():
    """Issue 30 item 4: named schedules, one typed field; the constant one's tail stays its own option."""
    from unnoise.train.loop import learning_rate

    linear = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, lr_schedule="linear")
    cosine = replace(linear, lr_schedule="cosine")
    for config in (linear, cosine):
        rates = [learning_rate(config, s) for s in range(110)]
        assert rates[0] == pytest.approx(1e-4) and rates[10] == pytest.approx(1e-3)
        assert all(a >= b for a, b in itertools.pairwise(rates[10:])) and rates[109] < 2e-5
    assert learning_rate(linear, 60) == pytest.approx(0.5e-3)  # half way down
    assert learning_rate(cosine, 60) == pytest.approx(0.5e-3)  # the cosine's midpoint too
    assert learning_rate(cosine, 35) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(UnnoiseError, match="one or the other"):
        replace(linear, lr_decay_fraction=0.2).validate()


def test_a_config_file_gives_options_and_the_flags_given_override_it(tmp_path):
    """Issue 30 item 4: `--config run.toml` (or JSON); names with - or _; the flags win; unknown names and
    broken files are one line each; the resolved config is written beside the run."""
    (tmp_path / "run.toml").write_text(
        'preset = "tiny"\nbatch-size = 4\nsteps = 2\nlr = 5e-4\nlr_schedule = "cosine"\nsample_every = 0\n'
    )
    out = tmp_path / "run"
    done = run_cli("train", "--config", str(tmp_path / "run.toml"), "--lr", "1e-3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "config.json").read_text())
    assert (saved["batch_size"], saved["steps"], saved["lr_schedule"], saved["lr"]) == (4, 2, "cosine", 1e-3)
    (tmp_path / "bad.json").write_text('{"preset": "tiny", "learning_rate": 1}')
    done = run_cli("train", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "unknown options learning_rate" in done.stderr
    wrong = (('{"steps": "abc"}', "steps must be int"), ('{"lr_schedule": "wild"}', "must be one of"))
    for text, said in wrong:
        (tmp_path / "typed.json").write_text(text)
        done = run_cli("train", "--config", str(tmp_path / "typed.json"), "--out", str(tmp_path / "z"))
        assert done.returncode == 2 and said in done.stderr, done.stderr
    (tmp_path / "broken.toml").write_text("steps = = 3")
    done = run_cli("train", "--config", str(tmp_path / "broken.toml"), "--out", str(tmp_path / "y"))
    assert done.returncode == 2 and "not valid TOML" in done.stderr


def test_the_training_density_of_sigma_moves_only_for_edm():
    from unnoise.train.loop import training_formulation

    moved = training_formulation(TrainConfig(sigma_p_mean=-0.4, sigma_p_std=1.0))
    assert (moved.p_mean, moved.p_std) == (-0.4, 1.0)
    log_sigma = moved.sample_sigma(20_000, torch.Generator().manual_seed(0)).log()
    assert abs(log_sigma.mean() + 0.4) < 0.03 and abs(log_sigma.std() - 1.0) < 0.03
    with pytest.raises(UnnoiseError, match="formulation has its own"):
        training_formulation(TrainConfig(formulation="flow", sigma_p_mean=0.0))
    with pytest.raises(UnnoiseError, match="--lr-decay-fraction"):
        TrainConfig(lr_decay_fraction=1.5).validate()
    with pytest.raises(UnnoiseError, match="--lr must be a positive number"):
        TrainConfig(lr=float("nan")).validate()


def test_auto_precision_uses_bf16_only_where_the_hardware_has_it():
    from unnoise.train.loop import native_bf16

    assert native_bf16(torch.device("cpu")) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert TrainConfig().precision == "auto"


def test_the_shapes_caption_mix_reaches_the_training_data():
    from unnoise.train.data import open_source

    source = open_source("shapes", 16, 0, "#ffffff", shapes_mix="single=1,relation=0,count=0,binding=0")
    _, captions = source.examples(list(range(40)))
    assert all(" and " not in c and not c.startswith(("two", "three", "four")) for c in captions)
    assert "caption mix single=1,relation=0,count=0,binding=0" in source.description


def test_a_model_trained_on_first_last_tokens_is_loaded_with_them(tmp_path):
    from unnoise.pipeline import load

    config = TrainConfig(preset="tiny", batch_size=2, steps=1, checkpoint_every=1, sample_every=0)
    train(replace(config, text_token_layers="first-last", out=str(tmp_path)))
    pipe = load(tmp_path / "model")
    assert pipe.text.encoder.token_layers == "first-last" and pipe.text.name.endswith("-first-last")
    with pytest.raises(UnnoiseError, match="--text-token-layers must be 'last' or 'first-last'"):
        replace(config, text_token_layers="all").validate()


def project_with_an_encoder(tmp_path: Path) -> tuple[Path, Path, Path]:
    """tmp_path/project with a text encoder at encoders/minilm (links to the packaged one), and an empty
    tmp_path/elsewhere to run from."""
    from unnoise.text.encoders import packaged_minilm_path

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    encoder = project / "encoders" / "minilm"
    encoder.mkdir(parents=True)
    elsewhere.mkdir()
    for file in packaged_minilm_path().iterdir():
        (encoder / file.name).symlink_to(file)
    return project, elsewhere, encoder


def test_a_model_trained_with_a_relative_text_encoder_path_loads_from_anywhere(tmp_path, monkeypatch):
    """Issue 13: config.json kept `--text-encoder encoders/minilm` as given, relative to where training
    ran; it now holds the path relative to the release, so the release loads from any directory and moves
    with its encoder."""
    from unnoise.pipeline import load

    project, elsewhere, encoder = project_with_an_encoder(tmp_path)
    monkeypatch.chdir(project)
    config = TrainConfig(preset="tiny", batch_size=2, steps=1, checkpoint_every=1, sample_every=0)
    train(replace(config, text_encoder="encoders/minilm", out="runs/relative"))
    _, release = load_release(project / "runs" / "relative" / "model")
    assert release["text_encoder"]["name"] == "../../../encoders/minilm"

    monkeypatch.chdir(elsewhere)
    assert load(project / "runs" / "relative" / "model").text.encoder.path == encoder
    moved = (tmp_path / "moved").resolve()
    project.rename(moved)
    assert load(moved / "runs" / "relative" / "model").text.encoder.path == moved / "encoders" / "minilm"


def test_a_releases_text_encoder_path_is_relative_to_the_release_then_to_where_it_was_trained(
    tmp_path, monkeypatch
):
    from unnoise.release import locate_text_encoder

    (tmp_path / "encoder").mkdir()
    release = tmp_path / "runs" / "run" / "model"
    release.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert locate_text_encoder(release, "../../../encoder") == str(tmp_path / "encoder")
    assert locate_text_encoder(release, "encoder") == str(tmp_path / "encoder")  # written before issue 13
    assert locate_text_encoder(release, "missing") == str(release / "missing")  # named in the error
    assert locate_text_encoder(release, "minilm") == "minilm"
    assert locate_text_encoder(release, str(tmp_path / "encoder")) == str(tmp_path / "encoder")


def test_the_loop_speaks_through_the_unnoise_train_logger(tmp_path, caplog):
    """Issue 12: the loop printed its messages; it logs them to `unnoise.train`, warnings as warnings."""
    caplog.set_level(logging.INFO, logger="unnoise.train")
    train(
        TrainConfig(
            preset="tiny", batch_size=4, steps=2, checkpoint_every=2, sample_every=0, out=str(tmp_path)
        )
    )
    assert {record.name for record in caplog.records} == {"unnoise.train"}
    assert caplog.messages[0].startswith("tiny unet") and caplog.messages[-1].startswith("done: 2 steps")


def test_without_logging_set_up_the_loops_messages_are_printed_as_before(capsys):
    from unnoise.train.loop import logger, show_messages_on_the_terminal

    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    try:
        show_messages_on_the_terminal()  # pytest's handlers on the root logger count as set up
        assert logger.handlers == handlers
        logger.handlers.clear()
        logger.propagate = False  # as in a process that never set logging up
        show_messages_on_the_terminal()
        show_messages_on_the_terminal()
        assert len(logger.handlers) == 1
        logger.info("resumed from step 4")
        assert capsys.readouterr().out == "resumed from step 4\n"
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def test_resume_warns_of_a_damaged_checkpoint(tmp_path, caplog):
    config = dict(preset="tiny", batch_size=4, checkpoint_every=2, sample_every=0, out=str(tmp_path))
    train(TrainConfig(steps=4, **config))
    (list_states(tmp_path)[0] / "ema.safetensors").write_bytes(b"half")
    train(TrainConfig(steps=4, **config), resume=True)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipping damaged checkpoint" in warnings[0], caplog.messages


def test_a_run_started_with_relative_folders_resumes_from_another_directory(tmp_path, monkeypatch):
    """The run's config.json names --text-encoder (and --data) folders absolutely, so `--resume` works from
    anywhere; before, it looked for encoders/minilm under wherever it was resumed from."""
    project, elsewhere, encoder = project_with_an_encoder(tmp_path)
    monkeypatch.chdir(project)
    common = ["--preset", "tiny", "--batch-size", "2", "--checkpoint-every", "1", "--sample-every", "0"]
    first = run_cli("train", *common, "--steps", "1", "--text-encoder", "encoders/minilm", "--out", "runs/r")
    assert first.returncode == 0, first.stderr
    assert TrainConfig.load(project / "runs" / "r" / "config.json").text_encoder == str(encoder.resolve())
    monkeypatch.chdir(elsewhere)
    again = run_cli("train", "--resume", "--steps", "2", "--out", str(project / "runs" / "r"))
    assert again.returncode == 0, again.stderr


def test_it_says_up_front_how_long_the_run_takes_and_checkpoints_by_time_too(tmp_path, caplog, monkeypatch):
    """Issue 31 item 10: after the first logged steps the run says the time left at the measured speed;
    `--checkpoint-minutes` checkpoints when that much time has passed, whatever --checkpoint-every says."""
    import unnoise.train.loop as loop

    clock = itertools.count(0.0, 31.0)  # each reading of the clock 31 s after the one before
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="unnoise.train")
    config = TrainConfig(
        preset="tiny", batch_size=4, steps=4, log_every=1, checkpoint_every=100, checkpoint_minutes=1.5,
        keep_checkpoints=10, sample_every=0, out=str(tmp_path),
    )  # fmt: skip
    train(config)
    (said,) = [m for m in caplog.messages if "steps left take about" in m]
    assert re.fullmatch(
        r"at \d+\.\d images/s the 3 steps left take about \d+ min \(done near \d\d:\d\d\); a checkpoint every"
        r" 100 steps and every 1.5 minutes",
        said,
    ), said
    saved = sorted(p.name for p in tmp_path.glob("state-*"))
    assert len(saved) >= 2 and saved[-1] == "state-00000004", saved  # by time before the last step
    without = replace(config, checkpoint_minutes=0.0, out=str(tmp_path / "steps-only"))
    train(without)
    assert [p.name for p in (tmp_path / "steps-only").glob("state-*")] == ["state-00000004"]


def test_a_second_os_process_on_the_same_run_folder_is_refused_until_the_first_is_killed(tmp_path):
    """Issue 31 item 2, across two processes: while one process holds the run folder, `unnoise train` there
    is one line naming it (exit 2); after a kill -9 of the holder the kernel has dropped its lock."""
    import signal
    import subprocess
    import sys

    from tests.conftest import run_cli

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom unnoise.train.checkpoint import RunLock\n"
         f"with RunLock({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ("train", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--sample-every", "0")
        refused = run_cli(*args, "--out", str(tmp_path))
        assert refused.returncode == 2 and f"PID {holder.pid}" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "model").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    done = run_cli(*args, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr


def test_the_first_trainer_finishes_bit_identical_to_a_solo_run_while_a_second_is_refused(tmp_path):
    """Issue 31's floor: a second `unnoise train` on a folder in use is refused, and the run in that folder
    ends with exactly the weights the same run makes alone."""
    import subprocess
    import sys
    import time

    from tests.conftest import run_cli
    from unnoise.release import sha256

    args = ["train", "--preset", "tiny", "--steps", "30", "--batch-size", "4", "--sample-every", "0"]
    first = subprocess.Popen([sys.executable, "-m", "unnoise", *args, "--out", str(tmp_path / "a")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    lock = tmp_path / "a" / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().startswith("PID")) and time.monotonic() < deadline:
        time.sleep(0.05)
    refused = run_cli(*args, "--out", str(tmp_path / "a"), "--resume")
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert refused.returncode == 2 and f"PID {first.pid}" in refused.stderr, refused.stderr
    alone = run_cli(*args, "--out", str(tmp_path / "b"))
    assert alone.returncode == 0, alone.stderr
    assert sha256(weights_of(tmp_path / "a" / "model")) == sha256(weights_of(tmp_path / "b" / "model"))


def test_init_from_fine_tunes_a_release_keeping_its_network_and_naming_its_parent(tmp_path):
    """Issue 30 item 1: the run starts from the release's weights, with its network, formulation and text
    encoder whatever the flags say, and its release names the parent."""
    from unnoise.release import load_release

    base = dict(preset="tiny", batch_size=4, sample_every=0, checkpoint_every=10)
    parent = train(TrainConfig(steps=2, formulation="vp", out=str(tmp_path / "parent"), **base))
    others = {k: v for k, v in base.items() if k != "preset"}
    child = train(TrainConfig(steps=1, lr=1e-9, warmup_steps=0, preset="small", init_from=str(parent),
                              out=str(tmp_path / "child"), **others))  # fmt: skip
    theirs, their_config = load_release(parent)
    ours, our_config = load_release(child)
    assert our_config["network"] == their_config["network"] and our_config["formulation"] == "vp"
    assert our_config["parent"] == {"name": "parent", "weights_sha256": their_config["weights_sha256"]}
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) < 1e-3  # lr 1e-9: barely moved
    with pytest.raises(UnnoiseError, match="no model 'nowhere'"):
        train(TrainConfig(steps=1, init_from="nowhere", out=str(tmp_path / "x"), **base))


def distance_to_folder(images, folder_pixels) -> float:
    """Mean over generated images of the root-mean-square pixel distance to the nearest folder image."""
    import numpy as np

    made = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])  # (N, H, W, 3)
    diffs = ((made[:, None] - folder_pixels[None]) ** 2).mean(axis=(2, 3, 4)) ** 0.5  # (N, F)
    return float(diffs.min(axis=1).mean())


def test_lora_training_moves_the_model_to_the_folder_and_scale_0_is_the_base(tmp_path):
    """Issue 30 item 2: adapters of rank 4 on the frozen shapes-32, trained 40 steps (about 10 s) on a
    folder of one colour, bring its samples for the folder's caption at least 50% nearer the folder's
    images (measured: 0.48 -> 0.10 RMS); the file holds the adapters alone (under 5% of the model); at scale
    0 the base model's images bit for bit."""
    import numpy as np
    from PIL import Image

    import unnoise
    from unnoise.release import load_release, resolve_model
    from unnoise.train.lora import LORA_FILE

    folder = tmp_path / "magenta"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (230 - 10 * i, 20 + 5 * i, 210)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a magenta patch")
    release = train(TrainConfig(data=str(folder), init_from="shapes-32", lora_rank=4, steps=40, lr=1e-2,
                                batch_size=4, sample_every=0, checkpoint_every=1000, warmup_steps=0,
                                out=str(tmp_path / "lora")))  # fmt: skip
    lora = release / LORA_FILE
    pipe = unnoise.load("shapes-32", device="cpu")
    before = pipe.generate("a magenta patch", seed=0, num_images=4, steps=8)
    pipe.add_lora(lora, 0.0)
    again = pipe.generate("a magenta patch", seed=0, num_images=4, steps=8)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in before]
    pipe.remove_loras()
    pipe.add_lora(lora, 1.0)
    after = pipe.generate("a magenta patch", seed=0, num_images=4, steps=8)
    pixels = np.stack([np.asarray(Image.open(folder / f"{i}.png"), dtype=np.float32) / 255 for i in range(4)])
    far, near = distance_to_folder(before, pixels), distance_to_folder(after, pixels)
    assert near < 0.5 * far, (far, near)
    model_bytes = sum(p.numel() * 2 for p in pipe.denoiser.network.parameters())  # its 16-bit release
    assert lora.stat().st_size < 0.05 * model_bytes
    base = json.loads((release / "config.json").read_text())["base"]
    assert base["weights_sha256"] == load_release(resolve_model("shapes-32"))[1]["weights_sha256"]


def test_a_watched_run_logs_tensorboard_validation_and_its_own_sample_prompts(tmp_path):
    """Issue 30 item 3: TensorBoard's scalars and sample grids, the held-out images' loss at fixed noise
    levels with each checkpoint (validation.csv), and the grid of the --sample-prompts file."""
    import tomllib
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (16, 16), (20 * i, 100, 200 - 10 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"concept number {i}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a thing\n\nanother thing\n")
    config = TrainConfig(
        data=str(folder), preset="tiny", steps=4, batch_size=4, log_every=2, checkpoint_every=2,
        sample_every=4, held_out=0.3, tensorboard=True, sample_prompts=str(prompts),
        out=str(tmp_path / "run"),
    )  # fmt: skip
    train(config)
    rows = (tmp_path / "run" / "validation.csv").read_text().splitlines()
    assert (
        rows[0].startswith("step,sigma_")
        and rows[0].endswith(",mean")
        and [r.split(",")[0] for r in rows[1:]] == ["2", "4"]
    )
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "validation/mean"} <= set(
        tags["scalars"]
    )
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4] and tags["images"] == ["samples"]
    from unnoise.images import contact_sheet

    blank = [Image.new("RGB", (16, 16))] * 2
    expected = contact_sheet(blank, ["a thing", "another thing"], scale=6, columns=4).size
    grid = Image.open(tmp_path / "run" / "samples" / "step-00000004.png")
    assert grid.size == expected  # the file's two prompts, not the folder's eight captions
    with pytest.raises(UnnoiseError, match="no prompt in it"):
        (tmp_path / "empty.txt").write_text("\n")
        TrainConfig(sample_prompts=str(tmp_path / "empty.txt")).validate()
    core = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith(("tensorboard", "diffusers")) for d in core)  # optional extras only


def test_regularization_mixes_the_models_own_data_into_every_batch_by_position(tmp_path):
    """--regularization shapes: about the asked share of each batch comes from the built-in shapes, decided
    by the sample's position alone (the same batch whatever makes it), the rest from the folder."""
    from PIL import Image

    from unnoise.train.data import MixedSource, open_source

    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (255, 0, 255)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a magenta patch")
    mixed = MixedSource(
        open_source(str(folder), 16, 0, "#ffffff"), open_source("shapes", 16, 1, "#ffffff"), 0.3, 0
    )
    images, captions = mixed.examples(list(range(400)))
    share = sum(c != "a magenta patch" for c in captions) / len(captions)
    assert images.shape == (400, 3, 16, 16) and 0.22 < share < 0.38, share
    again = mixed.examples([7, 3, 250])
    assert again[1] == [captions[7], captions[3], captions[250]] and torch.equal(again[0][2], images[250])
    run = train(TrainConfig(data=str(folder), regularization="shapes", preset="tiny", steps=2, batch_size=4,
                            sample_every=0, out=str(tmp_path / "run")))  # fmt: skip
    assert run.is_dir()
    with pytest.raises(UnnoiseError, match="regularization-fraction"):
        TrainConfig(regularization="shapes", regularization_fraction=1.0).validate()
