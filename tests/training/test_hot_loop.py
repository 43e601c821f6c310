"""The hot loop reads the device only every SYNC_STEPS steps (issue 12): the running sums it reports are the
float64 sums of every step's loss times its batch size and of the correct predictions, as if read at each step.
Device: the CPU."""

import pytest
import torch.nn.functional as F

from vggnet.training import build_run, fit, loop, resolve_config


@pytest.mark.parametrize("sync_steps, reads", [(10, 2), (1, 4), (2, 3)])  # 4 steps (i = 0..3): i = 0 and the
# last; every step; i = 0, 2 and the last
def test_sums_are_read_every_sync_steps_and_equal_per_step_arithmetic(train_options, tmp_path, monkeypatch,
                                                                      sync_steps, reads):
    monkeypatch.setattr(loop, "SYNC_STEPS", sync_steps)
    calls, losses = [], []
    real_sync, real_step = loop.sync_sums, loop.train_step

    def counting_sync(*args, **kwargs):
        calls.append(1)
        return real_sync(*args, **kwargs)

    def recording_step(run, images, labels, lr):
        loss, correct = real_step(run, images, labels, lr)
        losses.append((loss.item(), labels.numel(), int(correct)))  # the test may sync; the loop does not
        return loss, correct

    monkeypatch.setattr(loop, "sync_sums", counting_sync)
    monkeypatch.setattr(loop, "train_step", recording_step)
    config = resolve_config(**train_options(out=str(tmp_path / "run"), epochs=1))
    run = build_run(config)
    assert len(run.loader) == 4
    result = fit(run)
    assert len(calls) == reads
    loss_sum, correct, seen = 0.0, 0, 0
    for value, n, right in losses:  # the host arithmetic the loop used to do at every step
        loss_sum += value * n
        correct += right
        seen += n
    record = result["history"][0]
    assert record["train_loss"] == loss_sum / seen and record["train_acc"] == correct / seen


def test_a_non_finite_loss_is_caught_at_the_next_read_before_anything_is_saved(train_options, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(loop, "SYNC_STEPS", 10)
    steps = []

    def nan_at_step_2(*args, **kwargs):
        steps.append(1)
        loss = F.cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(steps) == 2 else loss

    monkeypatch.setattr(loop, "F", type("F", (), {"cross_entropy": staticmethod(nan_at_step_2)}))
    run_dir = tmp_path / "run"
    with pytest.raises(loop.TrainingDiverged, match="between steps 2 and 4") as err:
        fit(build_run(resolve_config(**train_options(out=str(run_dir), epochs=1))))
    assert "epoch 1" in str(err.value) and "no checkpoint" in str(err.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
    assert len(steps) == 4  # the epoch's last step is the next read: 4 steps of 32 on the tiny set


@pytest.mark.parametrize("plot_seconds, drawn", [(1e9, [3]), (0.0, [1, 2, 3])])
def test_plots_are_redrawn_only_when_stale_and_always_after_the_last_epoch(train_options, tmp_path, monkeypatch,
                                                                           plot_seconds, drawn):
    from vggnet.store.rundir import RunDir

    monkeypatch.setattr(loop, "PLOT_SECONDS", plot_seconds)
    curves, confusions = [], []
    monkeypatch.setattr(RunDir, "write_curves", lambda self, history, title: curves.append(len(history)))
    real_eval = RunDir.write_eval

    def recording_eval(self, result, title, out=None, plot=True):
        confusions.append(plot)
        return real_eval(self, result, title, out, plot)

    monkeypatch.setattr(RunDir, "write_eval", recording_eval)
    fit(build_run(resolve_config(**train_options(out=str(tmp_path / "run"), epochs=3))))
    assert curves == drawn
    assert confusions == [epoch in drawn for epoch in (1, 2, 3)]  # eval.json itself is written every epoch
    assert (tmp_path / "run" / "confusion.png").is_file()


def test_a_stop_after_an_epoch_draws_the_plots(train_options, tmp_path, monkeypatch):
    from vggnet.store.rundir import RunDir

    monkeypatch.setattr(loop, "PLOT_SECONDS", 1e9)
    curves = []
    monkeypatch.setattr(RunDir, "write_curves", lambda self, history, title: curves.append(len(history)))
    run = build_run(resolve_config(**train_options(out=str(tmp_path / "run"), epochs=3)))
    votes = iter([False] * 4 + [True])  # 4 steps of epoch 1 (none at a sync point stops), then the epoch-end vote
    monkeypatch.setattr(run.dist, "stop_requested", lambda signum: next(votes, False))
    with pytest.raises(loop.Interrupted, match="after epoch 1"):
        fit(run)
    assert curves == [1]
