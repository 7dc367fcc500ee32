"""Stopping early and cleanly: SIGINT, the time budget, an exception, early stopping. Each leaves a checkpoint
that resumes to the same weights as an uninterrupted run. SIGTERM to the real CLI is
in test_resume.py."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import metrics_records, write_yaml
from run_helpers import assert_same_state, checkpoint_dir, on_teacher_forward, training_state

from sakd.cli import main
from sakd.config import validate
from sakd.train import evaluate as evaluate_module
from sakd.train.loop import train


def _on_teacher_call(monkeypatch, call: int, action) -> None:
    """Run `action()` at the `call`-th teacher forward (1-based)."""
    on_teacher_forward(monkeypatch, lambda n, _output: action() if n == call else None)


def _only_checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_sigint_stops_at_the_step_boundary_and_exits_130(make_raw, reference_run, monkeypatch, capsys):
    """SIGINT in the middle of step 3's first micro-batch: step 3 finishes, is saved, the run stops."""
    ref = reference_run(make_raw())
    raw = make_raw(save_every=0)
    config = write_yaml(raw, Path(raw["output_dir"]).parent / "config.yaml")
    _on_teacher_call(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGINT))
    assert main(["train", str(config)]) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "SIGINT at step 3" in err and "--resume auto" in err
    run = Path(raw["output_dir"])
    assert _only_checkpoints(run) == ["step-000003"]
    assert not (run / "final").exists()

    monkeypatch.undo()
    assert main(["train", str(config), "--resume", "auto"]) == 0
    assert_same_state(checkpoint_dir(run, 8), checkpoint_dir(ref, 8))


def test_time_budget_saves_and_exits_cleanly_then_resumes(make_raw, reference_run, capsys):
    raw = make_raw(save_every=0)
    run = Path(raw["output_dir"])
    config = write_yaml(raw, run.parent / "config.yaml")
    assert main(["train", str(config), "--set", "train.max_minutes=0.0001"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert "time budget" in summary["stop_reason"] and summary["step"] == 1
    assert _only_checkpoints(run) == ["step-000001"]
    assert "time budget" in capsys.readouterr().out

    assert main(["train", str(config), "--resume", "auto"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 8 and summary["stop_reason"] == "max_steps"
    assert_same_state(checkpoint_dir(run, 8), checkpoint_dir(reference_run(make_raw()), 8))


def test_exception_mid_step_writes_an_emergency_checkpoint_of_the_last_finished_step(
    make_raw, reference_run, monkeypatch
):
    """A crash in step 3's second micro-batch (after the first one's backward and with the loader moved on):
    the emergency checkpoint is step 2 as it was at its end, and resuming from it gives the uninterrupted
    run's weights."""
    ref = reference_run(make_raw())
    raw = make_raw(save_every=0)
    run = Path(raw["output_dir"])

    def crash():
        raise RuntimeError("simulated crash")

    _on_teacher_call(monkeypatch, 6, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(validate(raw))
    assert _only_checkpoints(run) == ["step-000002"]
    assert_same_state(checkpoint_dir(run, 2), checkpoint_dir(ref, 2))

    monkeypatch.undo()
    train(validate(raw), resume="auto")
    assert_same_state(checkpoint_dir(run, 8), checkpoint_dir(ref, 8))


def _constant_eval(monkeypatch, bits_per_byte) -> None:
    """Held-out metrics from `bits_per_byte()` (called once per model evaluated) instead of a real pass."""

    def fake_metrics(sums):
        bpb = bits_per_byte()
        return {"loss": bpb, "perplexity": 2.0**bpb, "bits_per_byte": bpb, "tokens": 1, "bytes": 1}

    monkeypatch.setattr(evaluate_module, "metrics_from_sums", fake_metrics)


@pytest.mark.parametrize(("min_steps", "stop_step"), [(0, 3), (5, 5)])
def test_early_stop_mid_epoch_respects_min_steps(make_raw, small_data, monkeypatch, min_steps, stop_step):
    """With no improvement after the first evaluation and patience 2, the run stops cleanly
    at step 3 (or at early_stop_min_steps), mid-epoch, with a checkpoint and final/."""
    _constant_eval(monkeypatch, lambda: 5.0)
    raw = make_raw(
        max_steps=20,
        grad_accum=1,
        save_every=0,
        eval_every=1,
        early_stop_patience=2,
        early_stop_min_steps=min_steps,
    )
    raw["data"]["eval"] = [str(small_data["tiny"])]
    summary = train(validate(raw))
    assert summary["stop_reason"] == "early stop" and summary["step"] == stop_step
    run = Path(raw["output_dir"])
    assert [e["step"] for e in metrics_records(run, "eval")][:-1] == list(range(1, stop_step + 1))
    assert _only_checkpoints(run) == [f"step-{stop_step:06d}"]
    assert training_state(checkpoint_dir(run, stop_step))["loader"]["epoch"] == 0
    assert (run / "final" / "model.safetensors").is_file()


def test_no_early_stop_while_the_held_out_loss_improves(make_raw, small_data, monkeypatch):
    falling = iter(range(100, 0, -1))
    _constant_eval(monkeypatch, lambda: float(next(falling)))
    raw = make_raw(max_steps=5, grad_accum=1, save_every=0, eval_every=1, early_stop_patience=1)
    raw["data"]["eval"] = [str(small_data["tiny"])]
    summary = train(validate(raw))
    assert summary["stop_reason"] == "max_steps" and summary["step"] == 5
