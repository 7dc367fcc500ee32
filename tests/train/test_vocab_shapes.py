"""Teacher and student with sequences of different lengths and vocabularies of different (padded) sizes: nothing
may assume that position i or column j means the same on both sides."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sakd.config import validate
from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.train.loop import train


def test_teacher_and_student_windows_differ_in_length_yet_cover_the_same_bytes(assets):
    t_tok = AutoTokenizer.from_pretrained(assets["teacher"])
    s_tok = AutoTokenizer.from_pretrained(assets["student"])
    windows = build_windows([str(assets["train"])], s_tok, t_tok, max_length=64)
    assert any(len(w.teacher_ids) != len(w.student_ids) for w in windows)
    for w in windows:  # the teacher covers the student's aligned tokens: the whole groups inside its window
        aligned = w.student_group >= 0
        assert int(w.teacher_bytes.sum()) == int(w.student_bytes[aligned].sum())
    batch = next(iter(WindowLoader(windows, 4, seed=0, student=0, teacher=0)))
    assert batch.teacher.input_ids.shape[1] != batch.student.input_ids.shape[1]


def test_cross_vocab_training_with_padded_model_vocabularies(assets, base_config, tmp_path):
    """Model vocabularies padded beyond their tokenizers (as 152,064 vs 151,936), and of different sizes."""
    for name, extra in (("teacher", 64), ("student", 24)):
        cfg = AutoConfig.from_pretrained(assets[name])
        cfg.vocab_size += extra
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / name)
        AutoTokenizer.from_pretrained(assets[name]).save_pretrained(tmp_path / name)
    raw = {
        **base_config,
        "teacher": {"model": str(tmp_path / "teacher")},
        "student": {"model": str(tmp_path / "student")},
    }
    summary = train(validate(raw))
    assert summary["objective"] == "cross-vocabulary projection + chunk likelihood"
    assert summary["skipped_steps"] == 0
    assert summary["eval"]["kd"] > 0
