"""The GPU path (issue 12): the runtime decisions taken for a CUDA device, checked on any machine, and the CUDA runs
themselves (marked ``cuda``: skipped without a GPU): train, resume, eval and predict on CUDA, the data resident on
the GPU, AMP, and NCCL with one process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from vggnet import runtime
from vggnet.data import ImageDataset
from vggnet.training.distributed import Dist
from vggnet.evaluation.metrics import auto_batch_size

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ decisions (any machine)
@pytest.mark.parametrize("cores, cpu_threads, gpu_threads", [(1, 1, 1), (2, 2, 2), (16, 16, 2)])
def test_threads_default_to_every_core_on_the_cpu_and_two_beside_a_gpu(monkeypatch, cores, cpu_threads, gpu_threads):
    monkeypatch.setattr(runtime, "available_cores", lambda: cores)
    assert runtime.default_threads(CPU) == cpu_threads
    assert runtime.default_threads(CUDA) == gpu_threads == min(runtime.GPU_HOST_THREADS, cores)


@pytest.mark.parametrize("device, local_ranks, expected", [("cpu", 2, 8), ("cpu", 16, 1), ("cuda", 2, 2),
                                                           ("cuda", 8, 2), ("cuda", 16, 1)])
def test_torchrun_ranks_share_the_cores_and_take_at_most_two_beside_a_gpu(monkeypatch, device, local_ranks, expected):
    import vggnet.training.distributed as distributed

    monkeypatch.setattr(runtime, "available_cores", lambda: 16)
    monkeypatch.setattr(distributed, "available_cores", lambda: 16)
    dist = Dist(enabled=True, local_world_size=local_ranks, world_size=local_ranks, device=torch.device(device))
    assert dist.default_threads() == expected


def test_explicit_threads_win_over_the_device_default():
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(3, CUDA) == 3 and torch.get_num_threads() == 3
        assert runtime.set_threads(None, CPU) == runtime.available_cores()
    finally:
        torch.set_num_threads(before)


def test_data_stays_on_the_gpu_only_when_it_takes_a_quarter_of_its_free_memory_at_most():
    free = 80 * 2**30
    assert runtime.keeps_data_on_device(CUDA, free // 4, free_bytes=free)
    assert not runtime.keeps_data_on_device(CUDA, free // 4 + 1, free_bytes=free)
    assert runtime.RESIDENT_SHARE == 0.25
    assert not runtime.keeps_data_on_device(CPU, 1, free_bytes=free)  # the CPU: where the data already is


def test_dataset_to_its_own_device_is_itself():
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).view(2, 1, 3, 3)
    ds = ImageDataset(images, torch.tensor([1, 0]), ["a", "b"], "toy")
    assert ds.to("cpu") is ds  # already there: no copy


@pytest.mark.cuda
def test_dataset_to_the_gpu_moves_both_tensors_and_keeps_everything_else():
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.uint8).view(2, 1, 3, 3)
    ds = ImageDataset(images, torch.tensor([1, 0]), ["a", "b"], "toy")
    moved = ds.to("cuda")
    assert moved.images.device.type == moved.labels.device.type == "cuda"
    assert (moved.classes, moved.name) == (["a", "b"], "toy")
    assert torch.equal(moved.images.cpu(), images) and moved.labels.tolist() == [1, 0]


@pytest.mark.parametrize("size, cpu_batch, gpu_batch", [(32, 256, 1024), (64, 196, 784), (224, 16, 64),
                                                        (2000, 1, 1)])
def test_evaluation_batches_are_four_times_larger_on_a_gpu(size, cpu_batch, gpu_batch):
    assert auto_batch_size(size, size) == auto_batch_size(size, size, "cpu") == cpu_batch
    assert auto_batch_size(size, size, "cuda") == gpu_batch


# --------------------------------------------------------------------------------------------- CUDA runs (marked)
def _cuda_args(train_cli_args, *extra):
    """The tiny run's CLI arguments on CUDA (``--device cpu`` and ``--precision fp32`` replaced)."""
    args = train_cli_args(*extra)
    args[args.index("--device") + 1] = "cuda"
    return args


@pytest.mark.cuda
def test_cuda_training_keeps_the_data_on_the_gpu_and_evaluates_there(train_options, tmp_path):
    from vggnet.training import build_run, fit, resolve_config

    run = build_run(resolve_config(**train_options(device="cuda", precision="bf16", epochs=1, threads=None,
                                                   out=str(tmp_path / "run"))))
    assert run.runtime.device.type == "cuda" and run.runtime.threads == min(2, runtime.available_cores())
    assert run.train_set.images.device.type == run.test_set.images.device.type == "cuda"
    images, labels = next(iter(run.loader))
    assert images.device.type == labels.device.type == "cuda" and images.dtype == torch.uint8
    result = fit(run)
    assert 0.0 <= result["test_acc"] <= 1.0
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["n"] == len(run.test_set)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_cli_train_eval_predict_agree(train_cli, train_cli_args, tmp_path, precision):
    run_dir = tmp_path / f"run-{precision}"
    code, _, err = train_cli(_cuda_args(train_cli_args, "--out", run_dir, "--precision", precision))
    assert code == 0, err
    config = json.loads((run_dir / "config.json").read_text())
    assert config["precision"] == precision and config["device"] == "cuda"
    trained = json.loads((run_dir / "eval.json").read_text())
    code, out, err = train_cli(["eval", run_dir, "--device", "cuda", "--precision", precision, "--json"])
    assert code == 0, err
    again = json.loads(out)
    # The same weights, data and precision on the same GPU: the same predictions up to a near-tie flipping.
    assert abs(again["top1"] - trained["top1"]) <= 1 / trained["n"]


@pytest.mark.cuda
def test_cuda_predict_equals_cpu_predict_in_fp32(train_run_one_epoch, tmp_path):
    from vggnet.evaluation.metrics import predict_logits

    model, preprocess = train_run_one_epoch["model"], train_run_one_epoch["preprocess"]
    images = train_run_one_epoch["test_set"].images[:32]
    on_cpu = predict_logits(model, images, preprocess, CPU, "fp32")
    on_gpu = predict_logits(model.to(CUDA), images, preprocess, CUDA, "fp32")
    model.to(CPU)
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_nccl_with_one_process_trains_like_a_single_process(train_cli, train_cli_args, tmp_path):
    """torchrun with one CUDA process (NCCL, DistributedDataParallel) against the same run without torchrun, both
    --deterministic: DDP over one rank averages each gradient with itself, so the weights agree to rounding."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    code, _, err = train_cli(_cuda_args(train_cli_args, "--out", single, "--deterministic"))
    assert code == 0, err
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "vggnet",
               *[str(a) for a in _cuda_args(train_cli_args, "--out", ddp, "--deterministic")]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    from vggnet.base.files import load_tensors

    a, b = load_tensors(single / "model.safetensors"), load_tensors(ddp / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-5)
