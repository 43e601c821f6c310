"""fp16's gradient scaler (issue 12): a scaled step is the unscaled step, an inf gradient skips the step and halves
the scale, the scale survives a checkpoint; and under torchrun the stop vote happens only at the sync points.

Device: the CPU, where ``torch.amp.GradScaler("cpu")`` works although fp16 training itself is refused, so the CPU
tests put an enabled scaler into an fp32 run. The tests marked ``cuda`` run real fp16 (skipped without a GPU).
"""

import json
import math
import signal
from dataclasses import dataclass, field

import pytest
import torch

from vggnet.training.distributed import Dist
from vggnet.base.files import load_tensors
from vggnet.store.checkpoint import RunState
from vggnet.training import build, build_run, loop, resolve_config, resume, train
from vggnet.training import state as state_module


def cpu_scaler(init_scale=2.0**16, growth_interval=2000):
    return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)


def tiny_run(train_options, out, **overrides):
    return build_run(resolve_config(**train_options(out=str(out), **overrides)))


def epoch_batches(run):
    """The batches of epoch 1, with every random stream seeded as the loop seeds it; the network in training mode."""
    run.net.train()
    loop.seed_epoch(run, 0)
    return iter(run.loader)


def clone_all(tensors):
    return [t.detach().clone() for t in tensors]


def all_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def momentum(run):
    return [run.optimizer.state[p]["momentum_buffer"] for p in run.model.parameters()]


def same_weights(run_a, run_b):
    """Whether two runs' model.safetensors hold equal tensors, bit for bit (the files also embed each run's card,
    which names its folder)."""
    a, b = (load_tensors(run / "model.safetensors") for run in (run_a, run_b))
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def scaler_record(run_dir):
    return json.loads((run_dir / "state.json").read_text()).get("scaler")


# ------------------------------------------------------------------------------------------------ the scaled step
@pytest.mark.parametrize("grad_clip, batch_norm", [(None, False), (1e-3, True)])  # 1e-3: the clip always acts
def test_a_power_of_two_scale_changes_no_bit_of_an_fp32_step(train_options, tmp_path, grad_clip, batch_norm):
    """Multiplying the loss by 2^20 multiplies every gradient by 2^20 exactly, and unscaling divides it out exactly:
    three steps with the scaler leave the same bits as three without (clipping must see the unscaled gradients)."""
    options = dict(grad_clip=grad_clip, batch_norm=batch_norm)
    plain, scaled = tiny_run(train_options, tmp_path / "plain", **options), tiny_run(train_options,
                                                                                       tmp_path / "scaled", **options)
    assert plain.scaler is None  # fp32: no scaler of its own
    scaled.scaler = cpu_scaler(init_scale=2.0**20)
    start = clone_all(plain.model.parameters())
    assert all_equal(start, list(scaled.model.parameters()))
    for run in (plain, scaled):
        batches = epoch_batches(run)
        for _ in range(3):
            loop.train_step(run, *next(batches), run.config.lr)
    assert all_equal(list(plain.model.parameters()), list(scaled.model.parameters()))
    assert all_equal(momentum(plain), momentum(scaled))
    assert not any(torch.equal(a, b) for a, b in zip(start, plain.model.parameters()))  # real steps were taken
    assert scaled.scaler.state_dict() == {"scale": 2.0**20, "growth_factor": 2.0, "backoff_factor": 0.5,
                                          "growth_interval": 2000, "_growth_tracker": 3}


def poison(grad):
    """A gradient hook: one entry becomes inf, as when fp16 overflows under too high a scale."""
    grad = grad.clone()
    grad[(0,) * grad.dim()] = float("inf")
    return grad


def test_an_inf_gradient_skips_the_step_and_halves_the_scale(train_options, tmp_path):
    run = tiny_run(train_options, tmp_path / "run")
    run.scaler = cpu_scaler(init_scale=2.0**10)
    batches = epoch_batches(run)
    loop.train_step(run, *next(batches), run.config.lr)  # a good step first: momentum buffers exist
    weights, buffers = clone_all(run.model.parameters()), clone_all(momentum(run))
    handle = next(run.model.parameters()).register_hook(poison)
    loss, _ = loop.train_step(run, *next(batches), run.config.lr)
    handle.remove()
    assert torch.isfinite(loss)
    assert all_equal(list(run.model.parameters()), weights) and all_equal(momentum(run), buffers)  # no update at all
    assert (run.scaler.state_dict()["scale"], run.scaler.state_dict()["_growth_tracker"]) == (2.0**9, 0)
    loop.train_step(run, *next(batches), run.config.lr)  # the next good step goes through at the halved scale
    assert not any(torch.equal(a, b) for a, b in zip(weights, run.model.parameters()))
    assert (run.scaler.state_dict()["scale"], run.scaler.state_dict()["_growth_tracker"]) == (2.0**9, 1)


def test_a_skipped_step_in_the_loop_is_not_divergence(train_options, tmp_path, monkeypatch):
    """Step 2 of 4 gets an inf gradient: the epoch ends normally and its checkpoint records the halved scale, then
    two good steps (2^16 / 2, growth tracker 2)."""
    real_step, steps = loop.train_step, []

    def step_2_overflows(run, images, labels, lr):
        steps.append(1)
        handle = next(run.model.parameters()).register_hook(poison) if len(steps) == 2 else None
        out = real_step(run, images, labels, lr)
        if handle is not None:
            handle.remove()
        return out

    monkeypatch.setattr(loop, "train_step", step_2_overflows)
    run = tiny_run(train_options, tmp_path / "run", epochs=1)
    run.scaler = cpu_scaler()
    result = loop.fit(run)
    assert len(steps) == 4 and result["epochs"] == 1 and math.isfinite(result["history"][0]["train_loss"])
    assert scaler_record(tmp_path / "run") == {"scale": 2.0**15, "growth_factor": 2.0, "backoff_factor": 0.5,
                                               "growth_interval": 2000, "_growth_tracker": 2}


# ------------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_keep_the_scale_and_growth_tracker_exactly(train_options, tmp_path):
    """init 2^7, growth every 2 good steps, 3 steps: 2^7 -> 2^8 after step 2, then 1 good step counted."""
    out = tmp_path / "run"
    run = tiny_run(train_options, out)
    run.scaler = cpu_scaler(init_scale=2.0**7, growth_interval=2)
    batches = epoch_batches(run)
    for _ in range(3):
        loop.train_step(run, *next(batches), run.config.lr)
    run.rundir.create(run.saved_config)
    state_module.save_state(run, RunState(batch=3, step=3), [])
    saved = {"scale": 2.0**8, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2, "_growth_tracker": 1}
    assert scaler_record(out) == saved

    again = tiny_run(train_options, out)
    again.scaler = cpu_scaler()  # the defaults (2^16, every 2000 steps), replaced by the saved state
    state, _, _ = state_module.load_state(again)
    assert again.scaler.state_dict() == saved and state.step == 3
    assert again.scaler.scale(torch.ones(())).item() == 2.0**8  # the live scale the next step multiplies by


def test_a_checkpoint_without_scaler_state_loads_and_leaves_a_new_scaler_at_its_start(train_options, train_run_copy):
    assert scaler_record(train_run_copy) is None  # an fp32 run's checkpoint has no scaler
    run = tiny_run(train_options, train_run_copy, epochs=1)
    run.scaler = cpu_scaler(init_scale=2.0**5)
    state, _, _ = state_module.load_state(run)
    assert state.epoch == 1
    assert run.scaler.state_dict() == {"scale": 2.0**5, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 2000, "_growth_tracker": 0}


def test_resume_continues_with_the_saved_scale(train_options, tmp_path, monkeypatch):
    """Growth every 3 good steps, 4 steps an epoch: after epoch 1 the scale is 2^17 with 1 good step counted, after
    epoch 2 2^18 with 2. A resume that restarted the scaler would end at 2^17 with 1."""
    monkeypatch.setattr(build, "build_scaler", lambda runtime: cpu_scaler(growth_interval=3))
    train(**train_options(out=str(tmp_path / "straight"), epochs=2))
    train(**train_options(out=str(tmp_path / "resumed"), epochs=1))
    after_one = scaler_record(tmp_path / "resumed")
    assert (after_one["scale"], after_one["_growth_tracker"]) == (2.0**17, 1)
    resume(tmp_path / "resumed", epochs=2)
    straight, resumed = scaler_record(tmp_path / "straight"), scaler_record(tmp_path / "resumed")
    assert straight == resumed and (resumed["scale"], resumed["_growth_tracker"]) == (2.0**18, 2)
    assert same_weights(tmp_path / "straight", tmp_path / "resumed")


# ----------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_fp16_run_trains_with_a_scaler_and_resumes_bit_identically(train_options, tmp_path):
    options = dict(device="cuda", precision="fp16", deterministic=True, schedule="constant")
    straight = train(**train_options(out=str(tmp_path / "straight"), epochs=2, **options))
    train(**train_options(out=str(tmp_path / "resumed"), epochs=1, **options))
    resume(tmp_path / "resumed", epochs=2)
    assert all(math.isfinite(r["train_loss"]) for r in straight["history"])
    record = scaler_record(tmp_path / "straight")
    # 8 steps from 2^16: k skipped steps halve it k times, and the growth tracker counts the good steps since.
    assert record["scale"] in [2.0 ** (16 - k) for k in range(9)] and 0 <= record["_growth_tracker"] <= 8
    assert scaler_record(tmp_path / "resumed") == record
    assert same_weights(tmp_path / "straight", tmp_path / "resumed")


@pytest.mark.cuda
def test_cuda_only_fp16_gets_a_scaler(train_options, tmp_path):
    assert tiny_run(train_options, tmp_path / "bf16", device="cuda", precision="bf16").scaler is None
    fp16 = tiny_run(train_options, tmp_path / "fp16", device="cuda", precision="fp16").scaler
    assert isinstance(fp16, torch.amp.GradScaler) and fp16.is_enabled()


# ------------------------------------------------------------------------------------------------ the stop vote
@dataclass
class VotingDist(Dist):
    """A stand-in for torchrun's Dist (``enabled``) that counts the stop votes; one rank, so nothing to reduce."""

    votes: list = field(default_factory=list)

    def stop_requested(self, local_signum):
        self.votes.append(local_signum)
        return local_signum is not None

    def all_reduce(self, values):
        return list(values)

    def gather_rng(self, states):
        return {}


@pytest.mark.parametrize("enabled, sync_steps, votes", [
    (True, 10, 2),  # 4 steps (i = 0..3): i = 0 and the epoch's last
    (True, 2, 3),  # i = 0, 2 and the last
    (True, 1, 4),
    (False, 10, 4),  # one process: its own flag at every step
])
def test_the_stop_vote_happens_only_at_sync_points_under_torchrun(train_options, tmp_path, monkeypatch, enabled,
                                                                   sync_steps, votes):
    monkeypatch.setattr(loop, "SYNC_STEPS", sync_steps)
    run = tiny_run(train_options, tmp_path / "run")
    run.dist = VotingDist(enabled=enabled)
    state = loop.RunState()
    loop.train_epoch(run, state, [], 0, {"signum": None})
    assert run.dist.votes == [None] * votes and state.batch == 4


@pytest.mark.parametrize("enabled, stopped_after", [(True, 3), (False, 2)])  # SYNC_STEPS 2: sync points i = 0, 2, 3
def test_a_signal_stops_at_the_next_vote(train_options, tmp_path, monkeypatch, enabled, stopped_after):
    """The flag is set during step 2: torchrun's ranks stop after step 3 (the next sync point), one process after
    step 2; the saved state says where."""
    monkeypatch.setattr(loop, "SYNC_STEPS", 2)
    stop, real_step, steps = {"signum": None}, loop.train_step, []

    def signal_in_step_2(*args):
        steps.append(1)
        if len(steps) == 2:
            stop["signum"] = signal.SIGTERM
        return real_step(*args)

    monkeypatch.setattr(loop, "train_step", signal_in_step_2)
    run = tiny_run(train_options, tmp_path / "run")
    run.dist = VotingDist(enabled=enabled)
    run.rundir.create(run.saved_config)
    with pytest.raises(loop.Interrupted, match=f"batch {stopped_after}/4") as err:
        loop.train_epoch(run, loop.RunState(), [], 0, stop)
    assert err.value.signum == signal.SIGTERM and len(steps) == stopped_after
    assert run.dist.votes[-1] == signal.SIGTERM and run.dist.votes.count(signal.SIGTERM) == 1
    saved = json.loads((tmp_path / "run" / "state.json").read_text())["run"]
    assert (saved["batch"], saved["step"]) == (stopped_after, stopped_after)
