"""Issue 12: a thread count that degrades gracefully under load. `CpuShare` leaves other processes the
cores they keep busy: all cores when the machine is idle, one thread when others use them all, every core
where the machine's CPU times cannot be read; `--threads auto` and `serve --threads auto` use it."""

import os
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import run_cli
from unnoise.threads import CpuShare, cpu_times, usable_cpus


def write_stat(path, busy_jiffies: dict[int, int]) -> None:
    """A /proc/stat of 8 CPUs, CPU n busy `busy_jiffies[n]` (0 if not given) and idle a fixed amount."""
    lines = [f"cpu  {sum(busy_jiffies.values())} 0 0 8000 0 0 0 0 0 0"]
    lines += [f"cpu{n} {busy_jiffies.get(n, 0)} 0 0 1000 0 0 0 0 0 0" for n in range(8)]
    path.write_text("\n".join(lines) + "\nintr 0\n")


def test_an_idle_machine_gets_every_core(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, {})
    share = CpuShare(cpus=range(4), stat=stat)
    time.sleep(0.3)
    assert share.threads() == 4  # nobody else used any CPU time (this process's own is not counted)


def test_a_machine_kept_busy_by_others_gets_one_thread(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, {})
    share = CpuShare(cpus=range(4), stat=stat)
    time.sleep(0.3)
    write_stat(stat, {n: 10**9 for n in range(4)})  # others used far more than 4 cores' worth since
    assert share.threads() == 1


def test_only_the_cpus_this_process_may_use_are_counted(tmp_path):
    """In a container pinned to CPUs 0-3, the host's other tenants busy on CPUs 4-7 take nothing from it."""
    stat = tmp_path / "stat"
    write_stat(stat, {})
    share = CpuShare(cpus=range(4), stat=stat)
    time.sleep(0.3)
    write_stat(stat, {n: 10**9 for n in range(4, 8)})
    assert share.threads() == 4
    time.sleep(0.3)
    one_core = round(0.3 * os.sysconf("SC_CLK_TCK"))  # CPU 2 kept busy the whole 0.3 s: one core's worth
    write_stat(stat, {**{n: 10**9 for n in range(4, 8)}, 2: one_core})
    assert share.threads() == 3


def test_unreadable_cpu_times_leave_every_core(tmp_path):
    assert cpu_times(tmp_path / "missing") is None
    assert CpuShare(cpus=range(3), stat=tmp_path / "missing").threads() == 3
    (tmp_path / "garbage").write_text("not a stat file")
    assert CpuShare(cpus=range(3), stat=tmp_path / "garbage").threads() == 3
    write_stat(tmp_path / "other", {})
    assert cpu_times(tmp_path / "other", cpus=[42]) is None  # a CPU /proc/stat does not list
    assert CpuShare(cpus=[42], stat=tmp_path / "other").threads() == 1


@pytest.mark.skipif(cpu_times() is None, reason="needs /proc/stat (Linux)")
@pytest.mark.skipif(len(usable_cpus()) < 2, reason="needs two CPUs")
def test_a_real_competitor_leaves_one_thread_of_two():
    """A busy loop pinned to one of two CPUs: the share of those two is one thread."""
    pair = usable_cpus()[:2]
    competitor = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, pair[:1])
    )
    try:
        time.sleep(0.5)
        share = CpuShare(cpus=pair)
        time.sleep(1.0)
        assert share.threads() == 1
    finally:
        competitor.kill()
        competitor.wait()


def test_threads_auto_is_accepted_and_nonsense_is_named(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        run = run_cli("generate", "x", "--model", "nowhere", "--threads", "auto", "--out", str(tmp_path))
        assert run.returncode == 2 and "--threads" not in run.stderr  # accepted: the missing model fails
        from unnoise.cli import build_parser

        with pytest.raises(SystemExit) as exit:
            build_parser().parse_args(["generate", "x", "--threads", "many"])
        assert exit.value.code == 2
        assert "a number of threads or 'auto', not 'many'" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


class OneThread:
    def threads(self) -> int:
        return 1


def test_the_server_worker_sets_the_thread_count_before_each_job():
    from unnoise.server.jobs import Job, Worker

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        worker = Worker(lambda: "a model", cpu_share=OneThread())
        seen = []
        job = worker.submit(
            Job("generate", lambda pipe, report: seen.append(torch.get_num_threads()) or [], 0, 0)
        )
        while job.state not in ("done", "failed"):
            time.sleep(0.01)
        assert job.state == "done" and seen == [1]
    finally:
        torch.set_num_threads(before)


def test_serve_shares_the_cores_by_default_and_one_shot_commands_take_them_all():
    from unnoise.cli import build_parser

    assert build_parser().parse_args(["serve"]).threads == "auto"
    assert build_parser().parse_args(["serve", "--threads", "2"]).threads == 2
    assert build_parser().parse_args(["generate", "x"]).threads is None


def test_the_thread_count_does_not_change_the_images():
    """Why serve may pick its thread count per job: the same seeds give the same pixels at 1 and 2 threads."""
    import numpy as np

    import unnoise

    pipe = unnoise.load("shapes-32", device="cpu")
    before = torch.get_num_threads()
    drawn = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            images = pipe.generate("a red circle above a blue square", seed=3, num_images=2, steps=6)
            drawn[threads] = np.stack([np.asarray(image, dtype=np.int16) for image in images])
    finally:
        torch.set_num_threads(before)
    assert np.abs(drawn[1] - drawn[2]).max() <= 1  # identical on the machines measured; one level of rounding
