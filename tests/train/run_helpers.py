"""Helpers for the fault-tolerance tests: the teacher's forward and the models watched, checkpoint contents and
bit-for-bit comparisons of two checkpoints (the CLI in a subprocess and metrics records are in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from sakd.train import loop as loop_module
from sakd.train import step as step_module


def on_teacher_forward(monkeypatch, action=None) -> dict[str, int]:
    """Count the teacher's forward passes of training and evaluation (through a hook on its decoder, whatever
    calls it) and call `action(n, output)` after the n-th (1-based); a returned value replaces the decoder's
    output. The start-up checks (the head check's probe, the before-training measurement) are not counted."""
    real = step_module.load_model
    calls = {"n": 0}
    starting = {"now": False}

    def hook(_module, _args, output):
        if starting["now"]:
            return None
        calls["n"] += 1
        return action(calls["n"], output) if action is not None else None

    def loading(ref, role, *args, **kwargs):
        model = real(ref, role, *args, **kwargs)
        if role == "teacher":
            model.base_model.register_forward_hook(hook)
        return model

    def uncounted(check):
        def run(*args, **kwargs):
            starting["now"] = True
            try:
                return check(*args, **kwargs)
            finally:
                starting["now"] = False

        return run

    monkeypatch.setattr(step_module, "load_model", loading)
    for name in ("check_heads", "measure_before_training"):
        monkeypatch.setattr(loop_module, name, uncounted(getattr(loop_module, name)))
    return calls


def capture_models(monkeypatch) -> dict[str, torch.nn.Module]:
    """The teacher and student models the training loop loads, by role."""
    real = step_module.load_model
    models = {}

    def capturing(ref, role, *args, **kwargs):
        models[role] = real(ref, role, *args, **kwargs)
        return models[role]

    monkeypatch.setattr(step_module, "load_model", capturing)
    return models


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:06d}"


TIED = ("model.embed_tokens.weight", "lm_head.weight")


def with_tied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Both names of the tied embedding / LM head (a file stores one of them)."""
    for a, b in (TIED, TIED[::-1]):
        if a in weights and b not in weights:
            weights[b] = weights[a]
    return weights


def student_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Copies (load_file may map the file, and a test that damages it must keep the values it read), with
    both names of the tied embedding."""
    return with_tied({k: v.clone() for k, v in load_file(str(ckpt / "student.safetensors")).items()})


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (e.g. final/model.safetensors) with both names of the tied embedding."""
    return with_tied({k: v.clone() for k, v in load_file(str(path)).items()})


def training_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)


def assert_tensors_equal(a, b, where: str = "") -> None:
    """Nested dicts / lists of tensors, arrays and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_state(ckpt: Path, ref: Path) -> None:
    """Two checkpoints of the same step hold the same files, weights (student and heads), optimizer,
    scheduler, EMA, data position, counters and RNG states, bit for bit (wall-clock time aside)."""
    assert {p.name for p in ckpt.iterdir()} == {p.name for p in ref.iterdir()}
    assert_tensors_equal(student_weights(ckpt), student_weights(ref), "student")
    if (ref / "heads.safetensors").exists():
        heads = [load_weights(c / "heads.safetensors") for c in (ckpt, ref)]
        assert_tensors_equal(heads[0], heads[1], "heads")
    mine, theirs = training_state(ckpt), training_state(ref)
    for key in ("optimizer", "scheduler", "ema", "loader", "scaler"):
        assert_tensors_equal(mine[key], theirs[key], key)
    for key in ("step", "skipped_steps", "tokens_seen"):
        assert mine["loop"][key] == theirs["loop"][key], key
    assert_tensors_equal(
        torch.load(ckpt / "rng-rank0.pt", weights_only=True),
        torch.load(ref / "rng-rank0.pt", weights_only=True),
        "rng",
    )
