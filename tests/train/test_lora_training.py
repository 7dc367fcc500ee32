"""A LoRA student in real training runs: the same first loss as full fine-tuning, only the adapters in the
optimizer, EMA and checkpoints, a bit-exact resume, and a final/ folder whose merged weights give the adapted
model's logits."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from helpers import metrics_records
from run_helpers import (
    assert_same_state,
    assert_tensors_equal,
    capture_models,
    checkpoint_dir,
    load_weights,
    training_state,
)
from transformers import AutoModelForCausalLM

from sakd.config import validate
from sakd.models.lora import trainable_parameters
from sakd.train.loop import train

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _lora(raw: dict, **spec) -> dict:
    raw = copy.deepcopy(raw)
    raw["student"]["lora"] = {**LORA, **spec}
    return raw


def test_first_loss_equals_full_fine_tuning_and_only_the_adapters_train(base_config, monkeypatch, tmp_path):
    """Fresh adapters (B = 0) leave the student as it was: the loss of the first step is full fine-tuning's.
    The optimizer, the EMA and the checkpoint then hold the adapters only, and the base weights stay as loaded."""
    raw = copy.deepcopy(base_config)
    raw["data"]["eval"] = []
    raw["train"].update(max_steps=2, save_every=1)
    full = copy.deepcopy(raw)
    full["output_dir"] = str(tmp_path / "full")
    train(validate(full))
    lora = _lora(raw, dropout=0.0)
    models = capture_models(monkeypatch)
    train(validate(lora))

    first = [metrics_records(Path(r["output_dir"]), "train")[0] for r in (full, lora)]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-6)
    assert first[0]["loss_kd"] == pytest.approx(first[1]["loss_kd"], rel=1e-6)

    student = models["student"]
    adapters = trainable_parameters(student)
    ckpt = checkpoint_dir(Path(lora["output_dir"]), 2)
    weights = load_weights(ckpt / "student.safetensors")
    assert weights.keys() == adapters.keys() and all("lora_" in k for k in weights)
    state = training_state(ckpt)
    assert len(state["optimizer"]["state"]) == len(adapters)
    assert sum(len(g["params"]) for g in state["optimizer"]["param_groups"]) == len(adapters)
    assert state["ema"]["shadow"].keys() == adapters.keys()
    assert any(not torch.equal(weights[k], torch.zeros_like(weights[k])) for k in weights if "lora_B" in k)
    base = load_weights(Path(lora["student"]["model"]) / "model.safetensors")
    merged = load_weights(Path(lora["output_dir"]) / "final" / "model.safetensors")
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(
        merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"]
    )
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )


def test_final_merged_weights_give_the_adapted_models_logits(base_config, monkeypatch):
    from peft import PeftModel

    raw = _lora(base_config)
    raw["train"].update(max_steps=3)
    models = capture_models(monkeypatch)
    summary = train(validate(raw))
    final = Path(raw["output_dir"]) / "final"
    assert summary["final"]["weights"] in ("raw", "ema")

    student = models["student"].eval()
    ids = torch.randint(0, student.config.vocab_size, (2, 20))
    ema = summary["final"]["weights"] == "ema"
    with torch.no_grad():
        if ema:  # the export holds the EMA weights: compare with the adapted model under them
            shadow = training_state(checkpoint_dir(Path(raw["output_dir"]), 3))["ema"]["shadow"]
            params = dict(student.named_parameters())
            for name, value in shadow.items():
                params[name].copy_(value)
        adapted = student(ids).logits
        exported = AutoModelForCausalLM.from_pretrained(final).eval()(ids).logits
        torch.testing.assert_close(exported, adapted, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(raw["student"]["model"])
        reloaded = PeftModel.from_pretrained(base, final / "adapter").eval()
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert (final / "tokenizer.json").is_file() and (final / "sakd.json").is_file()


def _crashed_copy(ref: Path, run: Path, last_step: int) -> None:
    shutil.copytree(ref, run)
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > last_step:
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()


def test_lora_resume_is_bit_exact(make_raw, reference_run):
    """Killed after the checkpoint of step 2 and resumed: every later checkpoint (adapters, optimizer, EMA,
    RNG with adapter dropout on) and the merged export equal the uninterrupted run's bit for bit."""
    raw = _lora(make_raw(max_steps=4))
    ref = reference_run(raw)
    run = Path(raw["output_dir"])
    _crashed_copy(ref, run, 2)

    summary = train(validate(raw), resume="auto")

    assert summary["step"] == 4 and metrics_records(run, "resume")[-1]["step"] == 2
    for step in (3, 4):
        assert_same_state(checkpoint_dir(run, step), checkpoint_dir(ref, step))
    assert_tensors_equal(
        load_weights(run / "final/model.safetensors"), load_weights(ref / "final/model.safetensors"), "final"
    )
    before = load_weights(checkpoint_dir(ref, 2) / "student.safetensors")
    after = load_weights(checkpoint_dir(run, 3) / "student.safetensors")
    assert any(not torch.equal(after[k], before[k]) for k in after)


def test_a_full_checkpoint_does_not_resume_a_lora_student(make_raw, reference_run, capsys):
    from sakd.errors import UserError

    raw = make_raw(max_steps=2)
    ref = reference_run(raw)
    run = Path(raw["output_dir"])
    _crashed_copy(ref, run, 1)
    with pytest.raises(UserError, match="does not fit this student"):
        train(validate(_lora(raw)), resume="auto", force=True)
