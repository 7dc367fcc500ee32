"""Dtypes: trainable weights stay fp32 whatever the teacher's dtype, the teacher is
never touched, no cast leaks through a shared tensor; fp16 with a GradScaler on a GPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import capture_models, checkpoint_dir, load_weights, training_state
from transformers import AutoModelForCausalLM

from sakd.config import validate
from sakd.train import checkpoint
from sakd.train.loop import train


def test_bf16_teacher_fp32_student(make_raw, assets, small_data, monkeypatch):
    """One step with every loss on and a final evaluation (where Half/Float mismatches used to appear)."""
    models = capture_models(monkeypatch)
    raw = make_raw(losses="all", max_steps=1, grad_accum=1, warmup_steps=0)
    raw["teacher"]["dtype"] = "bf16"
    raw["data"]["eval"] = [str(small_data["tiny"])]
    summary = train(validate(raw))
    assert summary["skipped_steps"] == 0 and summary["eval"]["raw"]["bits_per_byte"] > 0
    # The process holds at least both models' weights: the reported peak cannot be below them.
    weights = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())
    method = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "VmHWM"
    assert summary["peak_memory"]["method"] == method and summary["peak_memory"]["gib"] * 2**30 > weights
    teacher, student = models["teacher"], models["student"]

    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in teacher.parameters())
    fresh = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.bfloat16).state_dict()
    for name, p in teacher.state_dict().items():
        assert torch.equal(p, fresh[name]), f"teacher {name} changed"

    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight, "tie broken"
    teacher_storage = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    assert not any(p.untyped_storage().data_ptr() in teacher_storage for p in student.parameters())

    run = Path(raw["output_dir"])
    final = load_weights(run / "final" / "model.safetensors")
    assert {v.dtype for v in final.values()} == {torch.float32}
    state = training_state(checkpoint_dir(run, 1))
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if v.numel() > 1]
    assert moments and {v.dtype for v in moments} == {torch.float32}


def test_bf16_autocast_student_passes_the_head_check(make_raw, small_data):
    """Under bf16 mixed precision the prepared student's forward runs in autocast, so its own logits are
    16-bit: the head check must compare sakd's head at that precision, not fail a plain Llama (a 1-step run
    on the CPU, where autocast works the same way as on a GPU)."""
    raw = make_raw(max_steps=1, grad_accum=1, warmup_steps=0, precision="bf16")
    raw["data"]["eval"] = [str(small_data["tiny"])]
    summary = train(validate(raw))
    assert summary["step"] == 1 and summary["eval"]["raw"]["bits_per_byte"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_with_grad_scaler_on_gpu(make_raw, monkeypatch):
    """fp16 autocast with fp32 master weights: no "Attempting to unscale FP16 gradients", optimizer steps
    happen, the scaler's state is checkpointed and restored on resume."""
    models = capture_models(monkeypatch)
    raw = make_raw(max_steps=4, grad_accum=2, precision="fp16")
    raw["teacher"]["dtype"] = "fp16"
    summary = train(validate(raw))
    assert summary["step"] == 4 and summary["skipped_steps"] < 4
    assert summary["peak_memory"]["method"] == "torch.cuda.max_memory_allocated"
    assert summary["peak_memory"]["gib"] > 0
    assert {p.dtype for p in models["student"].parameters()} == {torch.float32}
    assert {p.dtype for p in models["teacher"].parameters()} == {torch.float16}
    run = Path(raw["output_dir"])
    assert training_state(checkpoint_dir(run, 4))["scaler"]["scale"] > 0

    # A distinctive scale in the checkpoint of step 2 must be what the resumed run continues from.
    resumed = make_raw("resumed", max_steps=4, grad_accum=2, precision="fp16")
    resumed["teacher"]["dtype"] = "fp16"
    shutil.copytree(run, resumed["output_dir"])
    ckpts = Path(resumed["output_dir"]) / "checkpoints"
    for step in (3, 4):
        shutil.rmtree(checkpoint_dir(ckpts.parent, step))
    state = training_state(checkpoint_dir(ckpts.parent, 2))
    state["scaler"]["scale"] = 1024.0
    tmp = checkpoint.begin(ckpts, 2)
    for f in checkpoint_dir(ckpts.parent, 2).iterdir():
        if f.name != checkpoint.MANIFEST:
            shutil.copy(f, tmp / f.name)
    torch.save(state, tmp / "training_state.pt")
    checkpoint.commit(ckpts, tmp, 2, keep_last=5)
    train(validate(resumed), resume="auto")
    assert training_state(checkpoint_dir(ckpts.parent, 4))["scaler"]["scale"] <= 1024.0  # fresh: 65536
