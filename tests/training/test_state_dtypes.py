"""A state file whose header lies about a tensor's dtype is refused on resume (issue 14): ``load_state_dict`` would
convert the values silently (a float16 label on float32 bytes trains from garbage). Device: the CPU."""

import pytest
import torch

from vggnet.base.errors import CheckpointError
from vggnet.training import build_run, loop, resolve_config
from vggnet.training import state as state_module


@pytest.mark.parametrize("key_prefix, dtype", [("model/", torch.float16), ("optimizer/", torch.bfloat16),
                                               ("rng/torch", torch.int8)])
def test_a_state_tensor_of_another_dtype_is_refused(train_options, tmp_path, monkeypatch, key_prefix, dtype):
    run = build_run(resolve_config(**train_options(out=str(tmp_path / "run"), epochs=1)))
    loop.fit(run)
    real = run.rundir.read_state

    def lying_state():
        record, tensors = real()
        key = next(k for k in sorted(tensors) if k.startswith(key_prefix) and tensors[k].is_floating_point()
                   or k == key_prefix)
        tensors[key] = tensors[key].view(torch.uint8).view(dtype) if dtype.itemsize == 1 else tensors[key].to(dtype)
        return record, tensors

    monkeypatch.setattr(run.rundir, "read_state", lying_state)
    with pytest.raises(CheckpointError, match=r"state.safetensors is corrupt: .* this run keeps"):
        state_module.load_state(run)


def test_an_honest_state_loads(train_options, tmp_path):
    run = build_run(resolve_config(**train_options(out=str(tmp_path / "run"), epochs=1)))
    loop.fit(run)
    state, history, _ = state_module.load_state(run)
    assert state.epoch == 1 and len(history) == 1
