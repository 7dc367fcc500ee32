"""The training loop on tiny models: optimizer steps, schedule, evaluation, accumulation equivalence, guards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sakd.config import validate
from sakd.train.loop import train
from sakd.train.schedule import warmup_cosine


def _records(run: Path, event: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "student.safetensors"))


def _with(raw: dict, **train_overrides) -> dict:
    return {**raw, "train": {**raw["train"], **train_overrides}}


@pytest.mark.parametrize("grad_accum", [1, 2, 3, 4, 8])
def test_every_accumulation_cycle_steps_the_optimizer(base_config, grad_accum):
    """Weights and LR change after every optimizer step, whatever the accumulation (no cycle is lost)."""
    raw = _with(
        base_config,
        max_steps=3,
        grad_accum=grad_accum,
        batch_size=1,
        save_every=1,
        keep_last=10,
        warmup_steps=0,
        ema_decay=None,
    )
    raw["data"]["eval"] = []
    summary = train(validate(raw))
    assert summary["step"] == 3 and summary["skipped_steps"] == 0
    ckpts = sorted((Path(raw["output_dir"]) / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-000001", "step-000002", "step-000003"]
    before = load_file(str(Path(raw["student"]["model"]) / "model.safetensors"))
    states = [before] + [_weights(p) for p in ckpts]
    for a, b in zip(states[:-1], states[1:], strict=True):
        changed = [k for k in b if k in a and not torch.equal(a[k], b[k])]
        assert changed, "an optimizer step left every weight unchanged"
    lrs = [r["lr"] for r in _records(Path(raw["output_dir"]), "train")]
    assert len(lrs) == 3 and len(set(lrs)) == 3 and all(lr > 0 for lr in lrs)


def test_schedule_is_sized_in_optimizer_steps(base_config):
    """Warmup and cosine decay follow optimizer steps, not micro-batches."""
    raw = _with(
        base_config, max_steps=8, grad_accum=4, batch_size=1, warmup_steps=2, lr=1e-3, min_lr_ratio=0.1
    )
    raw["data"]["eval"] = []
    train(validate(raw))
    lrs = [r["lr"] for r in _records(Path(raw["output_dir"]), "train")]
    expected = [1e-3 * warmup_cosine(s, 2, 8, 0.1) for s in range(1, 9)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[-1] == pytest.approx(1e-4)


def test_warmup_cosine_shape():
    values = [warmup_cosine(s, 10, 110, 0.0) for s in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.5)  # cosine, not linear: halfway through decay the multiplier is 0.5
    assert values[35] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert values[110] == pytest.approx(0.0)


def test_periodic_evaluation_at_any_step(base_config):
    """Evaluation runs at every eval point; its distillation loss uses the training
    weights (so it is on the training loss's scale)."""
    raw = _with(base_config, max_steps=3, eval_every=1)
    summary = train(validate(raw))
    evals = _records(Path(raw["output_dir"]), "eval")
    assert [e["step"] for e in evals] == [1, 2, 3]
    for e in evals:
        assert e["raw"]["bits_per_byte"] > 0 and e["ema"]["bits_per_byte"] > 0
        assert math.isfinite(e["distill_loss"]) and e["kd"] > 0
    run = Path(raw["output_dir"])
    assert (run / "report.md").is_file() and (run / "report.html").is_file()  # written at the end of training
    assert any((run / "tensorboard").iterdir())
    train_loss = _records(run, "train")[-1]["loss"]
    assert 0.5 < summary["eval"]["distill_loss"] / train_loss < 2.0


AUX = ("feature", "attention", "router", "balance", "layerwise", "contrastive", "token_weighting")
PLAIN_KD = {"enabled": False, "weights": dict.fromkeys(AUX, 0.0)}
# The router's token weights have mean 1 per micro-batch and the balance and contrastive losses are batch
# statistics: only the token-level transfer losses are accumulation-invariant.
TOKEN_LEVEL_AUX = {
    "enabled": False,
    "weights": dict.fromkeys(("router", "balance", "contrastive", "token_weighting"), 0.0),
}


# Adam divides by the root of the squared gradient: where a gradient is nearly 0 (an embedding row of a rare
# token), float rounding of a different batch split moves the update by a few 1e-6.
@pytest.mark.parametrize("curriculum,atol", [(PLAIN_KD, 5e-6), (TOKEN_LEVEL_AUX, 1e-5)], ids=["kd", "aux"])
def test_batch4_equals_batch2_times_accumulation2(base_config, tmp_path, curriculum, atol):
    """Loss sums are normalised by the token count of the whole optimizer step, for KD + LM and for the
    token-level auxiliary losses (feature, attention, layer-wise). Eager attention over differently
    padded batches reorders float sums, hence the looser tolerance with attention transfer on."""
    finals = []
    for name, batch, accum in (("b4", 4, 1), ("b2x2", 2, 2)):
        raw = _with(
            base_config, max_steps=2, batch_size=batch, grad_accum=accum, ema_decay=None, max_grad_norm=None
        )
        raw["curriculum"] = curriculum
        raw["data"]["eval"] = []
        raw["output_dir"] = str(tmp_path / name)
        train(validate(raw))
        finals.append(_weights(sorted((tmp_path / name / "checkpoints").iterdir())[-1]))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-5, atol=atol)


def test_lm_only_training_without_teacher(base_config):
    raw = {k: v for k, v in base_config.items() if k != "teacher"}
    summary = train(validate(raw))
    assert summary["objective"] == "LM only"
    train_records = _records(Path(raw["output_dir"]), "train")
    assert "loss_kd" not in train_records[-1] or train_records[-1]["loss_kd"] == 0
    assert train_records[-1]["loss"] < train_records[0]["loss"] + 1.0


def test_same_vocabulary_distillation(base_config, assets):
    raw = {**base_config, "student": {"model": str(assets["student_same"])}}
    summary = train(validate(raw))
    assert summary["objective"].startswith("same-vocabulary")
    assert summary["eval"]["kd"] > 0


def test_nonfinite_teacher_skips_steps_and_leaves_weights_finite(base_config, monkeypatch):
    """A NaN is never hidden (no nan_to_num): the step is skipped and counted."""
    from sakd.train import teacher as teacher_module

    real = teacher_module.LiveTeacher.teacher_pass
    calls = {"n": 0}

    def poisoned(teacher, batch, *args):
        result = real(teacher, batch, *args)
        calls["n"] += 1
        if calls["n"] % 2 == 0:
            result.hidden[0] = float("nan")
        return result

    monkeypatch.setattr(teacher_module.LiveTeacher, "teacher_pass", staticmethod(poisoned))
    raw = _with(base_config, max_steps=6, nonfinite_max_rate=1.0, eval_every=0)
    raw["data"]["eval"] = []
    summary = train(validate(raw))
    assert summary["skipped_steps"] == 3
    skips = _records(Path(raw["output_dir"]), "skip")
    assert [s["step"] for s in skips] == [2, 4, 6] and all(s["windows"] for s in skips)
    final = _weights(sorted((Path(raw["output_dir"]) / "checkpoints").iterdir())[-1])
    assert all(torch.isfinite(v).all() for v in final.values())


def test_nonfinite_rate_stops_training_with_a_checkpoint(base_config, monkeypatch):
    from sakd.train import teacher as teacher_module
    from sakd.train.loop import TrainingStopped

    real = teacher_module.LiveTeacher.teacher_pass

    def poisoned(teacher, batch, *args):
        result = real(teacher, batch, *args)
        result.hidden.mul_(float("inf"))
        return result

    monkeypatch.setattr(teacher_module.LiveTeacher, "teacher_pass", staticmethod(poisoned))
    raw = _with(base_config, max_steps=20, nonfinite_max_rate=0.1, nonfinite_window=10)
    with pytest.raises(TrainingStopped, match="non-finite"):
        train(validate(raw))
    ckpts = list((Path(raw["output_dir"]) / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and ckpts[0].name == "step-000002"
