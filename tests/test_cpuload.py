"""Other processes' CPU load (vggnet.base.cpuload) and the thread count that follows it (vggnet.runtime): hand-computed
oracles on fake /proc/stat files and fake clocks, on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from vggnet import runtime
from vggnet.base.cpuload import LoadWindow, busy_seconds
from vggnet.runtime import AdaptiveThreads, Runtime, adaptive_threads, threads_for_load

CPU = torch.device("cpu")
HZ = os.sysconf("SC_CLK_TCK")
#           user nice system idle iowait irq softirq steal guest guest_nice
PROC_STAT = """cpu  160 10 60 5000 70 6 4 2 0 0
cpu0 100 4 40 2000 30 2 1 1 0 0
cpu1 60 6 20 3000 40 4 3 1 0 0
intr 12345 0 0
ctxt 999
"""


@pytest.fixture
def stat_file(tmp_path):
    path = tmp_path / "stat"
    path.write_text(PROC_STAT)
    return str(path)


def test_busy_seconds_sums_the_busy_columns_of_the_chosen_cpus(stat_file):
    # busy = user + nice + system + irq + softirq + steal (idle and iowait are not busy)
    assert busy_seconds(None, stat_file) == pytest.approx((160 + 10 + 60 + 6 + 4 + 2) / HZ)
    assert busy_seconds({0}, stat_file) == pytest.approx((100 + 4 + 40 + 2 + 1 + 1) / HZ)
    assert busy_seconds({1}, stat_file) == pytest.approx((60 + 6 + 20 + 4 + 3 + 1) / HZ)
    assert busy_seconds({0, 1}, stat_file) == pytest.approx(busy_seconds(None, stat_file))
    assert busy_seconds({7}, stat_file) == 0.0  # a CPU the file does not list
    assert busy_seconds(None, stat_file + ".missing") is None


def sequence(*values):
    it = iter(values)
    return lambda: next(it)


def test_load_window_is_the_machines_busy_time_minus_our_own_per_second():
    # busy 10 -> 14 s, own 1 -> 2 s, over 2 s of wall: (4 - 1) / 2 = 1.5 cores used by others
    window = LoadWindow(busy=sequence(10.0, 14.0, 14.5), own=sequence(1.0, 2.0, 3.0), clock=sequence(0.0, 2.0, 3.0))
    assert window.read() == pytest.approx(1.5)
    # the next window starts where the last ended: busy +0.5, own +1 (more than the machine: clamped to 0)
    assert window.read() == 0.0


def test_load_window_without_proc_stat_reads_none():
    window = LoadWindow(busy=lambda: None, own=sequence(0.0, 1.0), clock=sequence(0.0, 1.0))
    assert window.read() is None


@pytest.mark.parametrize("cores, other, threads", [
    (2, 0.0, 2), (2, 0.49, 2), (2, 0.5, 1), (2, 1.0, 1), (2, 1.6, 1), (2, 5.0, 1),
    (1, 0.0, 1), (1, 1.0, 1), (16, 4.2, 12), (16, 3.5, 12), (16, 0.3, 16)])
def test_threads_for_load_leaves_the_taken_cores_to_their_owners(cores, other, threads):
    assert threads_for_load(cores, other) == threads


def test_adaptive_threads_follow_the_load_and_come_back(restore_threads, fake_window):
    torch.set_num_threads(2)
    window = fake_window(1.0, 1.0, None, 0.1)
    threads = AdaptiveThreads(2, window, seconds=3.0)
    assert threads.poll() == 1 and torch.get_num_threads() == 1  # one core taken: one thread
    assert threads.poll() is None and torch.get_num_threads() == 1  # still taken: no change
    assert threads.poll() is None and torch.get_num_threads() == 1  # no reading: no change
    assert threads.poll() == 2 and torch.get_num_threads() == 2  # quiet again: every core
    assert window.reads == 4


def test_adaptive_threads_wait_for_the_window_to_end(restore_threads):
    window = LoadWindow(busy=sequence(0.0, 9.0), own=sequence(0.0, 0.0), clock=sequence(0.0, 1.0, 2.5, 3.0, 3.0))
    threads = AdaptiveThreads(2, window, seconds=3.0)
    assert threads.poll() is None  # 1 s of 3: the window is not read
    assert threads.poll() is None  # 2.5 s of 3
    torch.set_num_threads(2)
    assert threads.poll() == 1  # 3 s: 9 busy seconds of others / 3 s = 3 cores -> 1 thread


def test_only_a_cpu_run_without_threads_alone_and_not_deterministic_adapts():
    cpu = Runtime(CPU, "fp32", True, 2)
    assert isinstance(adaptive_threads(cpu, threads_given=False, distributed=False), AdaptiveThreads)
    assert adaptive_threads(cpu, threads_given=True, distributed=False) is None
    assert adaptive_threads(cpu, threads_given=False, distributed=True) is None
    assert adaptive_threads(Runtime(CPU, "fp32", True, 2, deterministic=True), False, False) is None
    assert adaptive_threads(Runtime(torch.device("cuda"), "bf16", True, 2), False, False) is None


def test_a_training_run_drops_to_one_thread_beside_a_busy_process(train_options, tmp_path, restore_threads,
                                                                   fake_window):
    from vggnet.training import build_run, fit, resolve_config

    pinned = build_run(resolve_config(**train_options(epochs=1, out=str(tmp_path / "pinned"))))
    assert pinned.threads is None  # --threads 1 given: nothing adapts
    run = build_run(resolve_config(**train_options(epochs=2, threads=None, out=str(tmp_path / "run"))))
    assert isinstance(run.threads, AdaptiveThreads) and run.threads.cores == runtime.available_cores()
    torch.set_num_threads(2)
    run.threads = AdaptiveThreads(2, fake_window(*[1.0] * 10_000), seconds=0.0)  # another process holds one core
    history = fit(run)["history"]
    assert [r["threads"] for r in history] == [1, 1] and torch.get_num_threads() == 1
