"""Streamed training across processes and machines (issue 21): two torchrun nodes on this machine (localhost
rendezvous) train from one prepared directory, each reading only its share, and take the same steps as one process
with the global batch, augmentation included (each sample's augmentation has its own seed); a stop mid-epoch
resumes bit-identically."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from vggnet.base.files import load_tensors
from vggnet.training import loop

LAUNCH_TIMEOUT = 240


@pytest.fixture(scope="module")
def prepared(small_prepared):
    return small_prepared


def train_args(prepared, out, *extra):
    # no dropout, no BN: per-rank random masks and batch statistics would make ranks legitimately differ
    return ["train", "--dataset", str(prepared), "--model", "custom", "--arch", "8,M,16,M", "--head", "gap",
            "--dropout", "0", "--image-size", "16", "--scale", "16", "24", "--batch-size", "8", "--epochs", "2",
            "--lr", "0.05", "--schedule", "constant", "--label-smoothing", "0", "--workers", "0", "--threads", "1",
            "--device", "cpu", "--precision", "fp32", "--no-progress", "--out", str(out), *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_take_the_same_steps_as_one_process(prepared, tmp_path):
    from vggnet.cli import main

    assert main(train_args(prepared, tmp_path / "one")) == 0
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("VGGNET_DEBUG", None)
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "vggnet", *train_args(prepared, tmp_path / "two")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    one = load_tensors(tmp_path / "one" / "model.safetensors")
    two = load_tensors(tmp_path / "two" / "model.safetensors")
    assert sorted(one) == sorted(two)
    assert max((one[k].double() - two[k].double()).abs().max().item() for k in one) < 1e-5
    assert "streamed from their shards" in outputs[0][1] and "streamed" not in outputs[1][1]  # rank 0 speaks


def test_a_streamed_run_stopped_mid_epoch_resumes_bit_identically(prepared, tmp_path, monkeypatch, cli):
    assert cli(train_args(prepared, tmp_path / "straight"))[0] == 0
    original, steps = loop.train_step, []

    def step_then_signal(run, images, labels, lr):
        out = original(run, images, labels, lr)
        steps.append(1)
        if len(steps) == 4:  # epoch 2, batch 1 of 3
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    code, _, err = cli(train_args(prepared, tmp_path / "run"))
    assert code == 128 + signal.SIGTERM, err
    monkeypatch.setattr(loop, "train_step", original)
    code, _, err = cli(["train", "--resume", str(tmp_path / "run"), "--workers", "2"])  # other workers: same images
    assert code == 0, err
    a = load_tensors(tmp_path / "straight" / "model.safetensors")
    b = load_tensors(tmp_path / "run" / "model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)
