"""Issue 12: a thread count that degrades gracefully under load. `CpuShare` leaves other processes the
cores they keep busy: all cores when the machine is idle, one thread when others use them all, every core
where the machine's CPU times cannot be read; `--threads auto` and `serve --threads auto` use it."""

import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import run_cli
from unnoise.threads import CpuShare, cpu_times


def write_stat(path, busy_jiffies: int) -> None:
    """A /proc/stat whose machine has been busy `busy_jiffies` and idle a fixed amount."""
    path.write_text(f"cpu  {busy_jiffies} 0 0 1000 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")


def test_an_idle_machine_gets_every_core(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, 0)
    share = CpuShare(cores=4, stat=stat)
    time.sleep(0.3)
    assert share.threads() == 4  # nobody else used any CPU time (this process's own is not counted)


def test_a_machine_kept_busy_by_others_gets_one_thread(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, 0)
    share = CpuShare(cores=4, stat=stat)
    time.sleep(0.3)
    write_stat(stat, 10**9)  # others used far more than 4 cores' worth since
    assert share.threads() == 1


def test_unreadable_cpu_times_leave_every_core(tmp_path):
    assert cpu_times(tmp_path / "missing") is None
    assert CpuShare(cores=3, stat=tmp_path / "missing").threads() == 3
    (tmp_path / "garbage").write_text("not a stat file")
    assert CpuShare(cores=3, stat=tmp_path / "garbage").threads() == 3


@pytest.mark.skipif(cpu_times() is None, reason="needs /proc/stat (Linux)")
def test_a_real_competitor_leaves_one_thread_of_two():
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        share = CpuShare(cores=2)
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
