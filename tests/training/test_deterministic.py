"""``--deterministic``: recorded in config.json, kept on resume, the global settings restored after; on the CPU the
same numbers as without it (bit for bit); on CUDA (marked ``cuda``, skipped without a GPU) same-seed and resumed
runs bit-identical."""

import json
import os

import pytest
import torch

from vggnet.training import resume, train


def weights_bytes(run_dir):
    """model.safetensors' tensor data, bit for bit: the bytes after its header (which embeds the run's card, and so
    its folder and options)."""
    raw = (run_dir / "model.safetensors").read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def test_cpu_deterministic_run_equals_the_default_run_and_restores_the_settings(train_options, tmp_path):
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    train(**train_options(out=str(tmp_path / "plain"), epochs=1))
    train(**train_options(out=str(tmp_path / "det"), epochs=1, deterministic=True))
    assert weights_bytes(tmp_path / "det") == weights_bytes(tmp_path / "plain")
    assert json.loads((tmp_path / "det" / "config.json").read_text())["deterministic"] is True
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["deterministic"] is False
    after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    assert after == before


def test_the_mode_is_active_during_training_and_kept_on_resume(train_options, tmp_path, monkeypatch):
    seen = []
    import vggnet.training as training

    real_fit = training.fit

    def spy(run, *args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG"), run.runtime.deterministic))
        return real_fit(run, *args, **kwargs)

    monkeypatch.setattr(training, "fit", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    out = tmp_path / "run"
    train(**train_options(out=str(out), epochs=1, schedule="constant", deterministic=True))
    resume(out, epochs=2)
    assert seen == [(True, True, ":4096:8", True)] * 2
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_train_cli_flag(train_cli, train_cli_args, tmp_path):
    out = tmp_path / "run"
    code, _, err = train_cli(train_cli_args("--epochs", "1", "--deterministic", "--out", str(out)))
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["deterministic"] is True


@pytest.mark.cuda
def test_cuda_same_seed_and_resumed_runs_are_bit_identical(train_options, tmp_path):
    options = dict(device="cuda", deterministic=True, schedule="constant", dropout=0.1)
    train(**train_options(out=str(tmp_path / "a"), epochs=2, **options))
    train(**train_options(out=str(tmp_path / "b"), epochs=2, **options))
    train(**train_options(out=str(tmp_path / "c"), epochs=1, **options))
    resume(tmp_path / "c", epochs=2)
    assert weights_bytes(tmp_path / "a") == weights_bytes(tmp_path / "b") == weights_bytes(tmp_path / "c")
