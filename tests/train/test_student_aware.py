"""The router, curriculum and auxiliary losses inside real training runs (tiny MoE teacher, cross-vocab)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import metrics_records
from safetensors.torch import load_file

from sakd.config import validate
from sakd.curriculum import ALL_LOSSES_ON, ALL_LOSSES_PHASES, CurriculumSpec, curriculum_at
from sakd.models.load import load_tokenizer
from sakd.router import blend_token_weights
from sakd.tools.ablate import VARIANTS
from sakd.train import auxiliary
from sakd.train.inputs import training_inputs
from sakd.train.loop import curriculum_point, train
from sakd.train.rows import LossNorm, with_loss_rows
from sakd.train.step import build_training, step_batches


def test_curriculum_phases_losses_and_router_heads(base_config):
    raw = {
        **base_config,
        "train": {**base_config["train"], "max_steps": 10, "save_every": 1, "keep_last": 20, "eval_every": 4},
    }
    raw["router"] = {"lr": 5e-3}
    raw["curriculum"] = {"weights": ALL_LOSSES_ON, "phases": ALL_LOSSES_PHASES}
    cfg = validate(raw)
    train(cfg)
    run = Path(raw["output_dir"])
    steps = metrics_records(run, "train")
    assert [r["phase"] for r in steps] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    for r in steps:
        point = curriculum_point(cfg, r["step"] - 1)
        assert r["weight_feature"] == point.weights["feature"] and r["top_k"] == point.top_k
    phase1, phase3 = steps[0], steps[-1]
    assert "loss_router" not in phase1 and "loss_feature" not in phase1
    for part in ("kd", "lm", "feature", "attention", "router", "balance", "layerwise", "contrastive"):
        value = phase3[f"loss_{part}"]
        assert value == value and abs(value) < float("inf"), part  # logged and finite
    # Evaluation at step 8 weighs the losses as training does at step 8 (else the two are not comparable).
    ev = next(r for r in metrics_records(run, "eval") if r["step"] == 8)
    assert set(ev["parts"]) >= {"kd", "lm", "feature", "router"}
    # The router and projection heads train (phase 3) and are checkpointed beside the student.
    ckpts = run / "checkpoints"
    before, after = (load_file(str(ckpts / f"step-{s:06d}" / "heads.safetensors")) for s in (8, 9))
    router_keys = [k for k in before if k.startswith("router.")]
    assert router_keys and any(not torch.equal(before[k], after[k]) for k in router_keys)
    assert not any(
        k.startswith("router.") for k in load_file(str(ckpts / "step-000009" / "student.safetensors"))
    )
    state = torch.load(ckpts / "step-000009" / "training_state.pt", weights_only=True)
    assert [g["lr"] for g in state["optimizer"]["param_groups"]][-1] != state["optimizer"]["param_groups"][0][
        "lr"
    ]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_ablation_variants_are_valid_curricula(name):
    spec = CurriculumSpec.model_validate(VARIANTS[name])
    assert spec.weights.kd > 0 and spec.weights.lm > 0


def test_token_weighting_strength_is_honoured(base_config, monkeypatch):
    """The configured strength s blends the router's KD token weights with ones: s = 0 is plain KD, and the KD
    loss is linear in s (0.3 is not 1.0)."""
    raw = {**base_config, "curriculum": {"enabled": False, "weights": {"token_weighting": 1.0}}}
    cfg = validate(raw)
    accelerator = Accelerator(cpu=True)
    student_tok = load_tokenizer(cfg.student.tokenizer_path, "student")
    teacher_tok = load_tokenizer(cfg.teacher.tokenizer_path, "teacher")
    inputs = training_inputs(cfg, student_tok, teacher_tok, processes=1, progress=False)
    t = build_training(cfg, accelerator, "fp32", student_tok, teacher_tok, inputs.cached)
    batch = with_loss_rows(inputs.loader(cfg, accelerator, student_tok, teacher_tok).next_batch())
    counts = step_batches([batch], accelerator).counts
    blended = []

    def spy(weights, strength):
        blended.append(blend_token_weights(weights, strength))
        return blended[-1]

    monkeypatch.setattr(auxiliary, "blend_token_weights", spy)

    def kd_at(strength: float) -> torch.Tensor:
        spec = CurriculumSpec.model_validate({"enabled": False, "weights": {"token_weighting": strength}})
        return t.objective(t.student, batch, curriculum_at(0.5, spec), LossNorm(counts))[1]["kd"]

    plain, full, part = kd_at(0.0), kd_at(1.0), kd_at(0.3)
    assert not blended[0].equal(torch.ones_like(blended[0]))  # the full weights are not uniform
    torch.testing.assert_close(blended[1], 1.0 + 0.3 * (blended[0] - 1.0))
    assert (blended[1] - 1).abs().max() < (blended[0] - 1).abs().max()
    assert blended[1].mean().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.isclose(full, plain) and not torch.isclose(part, full)
    torch.testing.assert_close(part, plain + 0.3 * (full - plain))
