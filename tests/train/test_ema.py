"""EMA of the student's weights: warmup, updates only after real optimizer steps, raw and EMA
both evaluated, and final/ holds exactly the weights it says it holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import metrics_records
from run_helpers import (
    checkpoint_dir,
    load_weights,
    on_teacher_forward,
    student_weights,
    training_state,
    with_tied,
)
from torch import nn

from sakd.config import validate
from sakd.train import evaluate as evaluate_module
from sakd.train.ema import EMA
from sakd.train.loop import train


def test_effective_decay_warms_up_from_zero_to_the_configured_decay():
    ema = EMA(nn.Linear(2, 2), decay=0.99)
    decays = []
    for _ in range(2000):
        decays.append(float(ema.effective_decay()))
        ema._updates += 1
    assert decays[0] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(decays, decays[1:], strict=False))
    assert decays[100] < 0.99 and decays[-1] == 0.99


def test_high_decay_ema_follows_training_instead_of_keeping_the_init():
    """With decay 0.9999 and 20 updates a plain EMA would still be 99.8% the initial weights."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    init = model.weight.detach().clone()
    ema = EMA(model, decay=0.9999)
    target = torch.randn(4, 4)
    for i in range(1, 21):
        with torch.no_grad():
            model.weight.copy_(init + (target - init) * i / 20)
        ema.update(model)
    shadow = ema.shadow["weight"]
    assert (shadow - target).norm() < 0.5 * (init - target).norm()


def test_applied_swaps_in_the_ema_and_restores_the_raw_weights():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.5)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    moved = model.weight.detach().clone()
    with ema.applied(model):
        assert torch.equal(model.weight, raw["weight"])
    assert torch.equal(model.weight, moved)


def test_state_dict_round_trip():
    model = nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.mul_(2)
    ema.update(model)
    restored = EMA(nn.Linear(3, 3), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and restored.decay == 0.9
    assert all(torch.equal(restored.shadow[k], ema.shadow[k]) for k in ema.shadow)
    assert float(restored.effective_decay()) == float(ema.effective_decay())


def test_a_skipped_step_leaves_the_ema_unchanged(make_raw, monkeypatch):
    def poison_second(n, output):
        if n == 2:
            output.last_hidden_state.fill_(float("nan"))

    on_teacher_forward(monkeypatch, poison_second)
    raw = make_raw(max_steps=3, grad_accum=1, nonfinite_max_rate=1.0)
    summary = train(validate(raw))
    assert summary["skipped_steps"] == 1
    run = Path(raw["output_dir"])
    emas = [training_state(checkpoint_dir(run, s))["ema"] for s in (1, 2, 3)]
    assert [e["updates"] for e in emas] == [1, 1, 2]
    assert all(torch.equal(emas[0]["shadow"][k], emas[1]["shadow"][k]) for k in emas[0]["shadow"])
    assert any(not torch.equal(emas[1]["shadow"][k], emas[2]["shadow"][k]) for k in emas[1]["shadow"])


def test_high_decay_ema_is_not_stuck_at_the_init_in_training(make_raw, dropout_student):
    raw = make_raw(max_steps=4, ema_decay=0.9999, save_every=0)
    train(validate(raw))
    init = load_weights(dropout_student / "model.safetensors")
    state = training_state(checkpoint_dir(Path(raw["output_dir"]), 4))
    final = student_weights(checkpoint_dir(Path(raw["output_dir"]), 4))
    moved = [k for k in final if not torch.equal(final[k], init[k])]
    assert moved
    for k in moved:
        travelled = (with_tied(state["ema"]["shadow"])[k] - init[k]).norm()
        assert travelled > 0.5 * (final[k] - init[k]).norm(), k


@pytest.mark.parametrize("handicapped", ["raw", "ema"])
def test_final_holds_the_better_weights_and_says_which(make_raw, small_data, monkeypatch, handicapped):
    """Held-out bits per byte of one of the two is raised (after the real evaluation), so each choice
    happens; final/model.safetensors must then equal the chosen weights, not the other ones."""
    real = evaluate_module.metrics_from_sums
    calls = {"n": 0}

    def handicap(sums):
        result = real(sums)
        calls["n"] += 1
        which = "raw" if calls["n"] % 2 == 1 else "ema"  # evaluate_student measures raw, then EMA
        if which == handicapped:
            result["bits_per_byte"] += 10.0
        return result

    monkeypatch.setattr(evaluate_module, "metrics_from_sums", handicap)
    raw = make_raw(max_steps=3, grad_accum=1, save_every=0, eval_every=1)
    raw["data"]["eval"] = [str(small_data["tiny"])]
    summary = train(validate(raw))
    chosen = "ema" if handicapped == "raw" else "raw"
    run = Path(raw["output_dir"])

    evals = metrics_records(run, "eval")
    assert len(evals) == 3 and all("bits_per_byte" in e["raw"] and "bits_per_byte" in e["ema"] for e in evals)
    info = json.loads((run / "final" / "sakd.json").read_text())
    assert info["weights"] == chosen == summary["final"]["weights"]
    assert info["bits_per_byte"] == min(evals[-1]["raw"]["bits_per_byte"], evals[-1]["ema"]["bits_per_byte"])

    ckpt = checkpoint_dir(run, 3)
    weights = {"raw": student_weights(ckpt), "ema": with_tied(training_state(ckpt)["ema"]["shadow"])}
    exported = load_weights(run / "final" / "model.safetensors")
    assert exported and all(v.dtype == torch.float32 for v in exported.values())
    for k, v in exported.items():
        assert torch.equal(v, weights[chosen][k]), k
    other = "raw" if chosen == "ema" else "ema"
    assert any(not torch.equal(v, weights[other][k]) for k, v in exported.items())


def test_frozen_weights_are_left_out_tied_names_included():
    """A frozen weight never changes: the EMA keeps no copy of it, under either name of a tied pair; a
    trainable one is averaged as before."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False), nn.Linear(5, 5))
    model[1].weight = model[0].weight  # tied, as a LM head to its embedding
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.5)
    assert set(ema.shadow) == {"2.weight", "2.bias"}
    with torch.no_grad():
        model[2].weight.add_(1.0)
    before = ema.shadow["2.weight"].clone()
    ema.update(model)
    assert not torch.equal(ema.shadow["2.weight"], before)
    with ema.applied(model):
        assert torch.equal(model[2].weight, ema.shadow["2.weight"])
