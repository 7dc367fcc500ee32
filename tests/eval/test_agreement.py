"""Teacher-student agreement on aligned positions against a direct computation on full logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.eval.agreement import EXACT_KL, PROJECTED_KL, agreement_metrics
from sakd.eval.run import EvalData, evaluate_agreement
from sakd.losses import build_vocab_mapping, projected_teacher_probs


def _load(folder):
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()


def test_a_student_that_is_the_teacher_agrees_fully(assets):
    tok, model = _load(assets["student_same"])
    got = evaluate_agreement(
        model, tok, model, tok, EvalData([str(assets["eval"])], max_length=48, max_windows=4)
    )
    assert got["kl_kind"] == EXACT_KL and got["positions"] > 50 and got["unscored_positions"] == 0
    assert got["top1_agreement"] == 1.0 and got["top_k_overlap"] == 1.0
    assert abs(got["kl"]) < 1e-5


def _direct(student, teacher, windows, mapping, vocab, k):
    """Per window (no padding), full logits of both models at the last token of every group but the last."""
    top1, overlap, kl = [], [], []
    with torch.no_grad():
        for w in windows:
            s_logits = student(torch.as_tensor(w.student_ids)[None]).logits[0]
            t_logits = teacher(torch.as_tensor(w.teacher_ids)[None]).logits[0]
            s_last = np.flatnonzero(np.append(w.student_group[1:] != w.student_group[:-1], True))[:-1]
            t_last = np.flatnonzero(np.append(w.teacher_group[1:] != w.teacher_group[:-1], True))[:-1]
            s, t = s_logits[s_last].double(), t_logits[t_last].double()
            if mapping is None:
                q, p = torch.softmax(s[:, :vocab], -1), torch.softmax(t[:, :vocab], -1)
            else:
                q, p = torch.softmax(s, -1), projected_teacher_probs(t, mapping, 1.0, s.shape[-1]).double()
            for q_row, p_row in zip(q, p, strict=True):
                top1.append(float(q_row.argmax() == p_row.argmax()))
                teacher_top = {int(i) for i in p_row.topk(k).indices if p_row[i] > 0}
                overlap.append(len(teacher_top & {int(i) for i in q_row.topk(k).indices}) / k)
                nz = p_row > 0
                kl.append(float((p_row[nz] * (p_row[nz].log() - q_row[nz].log())).sum()))
    return np.mean(top1), np.mean(overlap), np.mean(kl), len(top1)


@pytest.mark.parametrize("student_name", ["student", "student_same"], ids=["cross-vocab", "same-vocab"])
def test_agreement_equals_a_direct_computation(assets, student_name):
    s_tok, student = _load(assets[student_name])
    t_tok, teacher = _load(assets["teacher"])
    windows = build_windows([str(assets["eval"])], s_tok, t_tok, max_length=40, max_windows=3)
    cross = student_name == "student"
    mapping = build_vocab_mapping(t_tok, s_tok) if cross else None
    if not cross:  # one tokenizer: every token is a group and windows are full; shorten one to get padding
        w = windows[1]
        for side in ("student", "teacher"):
            for key in ("ids", "bytes", "group"):
                setattr(w, f"{side}_{key}", getattr(w, f"{side}_{key}")[:20])
    batches = WindowLoader(
        windows,
        3,
        0,
        shuffle=False,
        drop_last=False,
        student=s_tok.pad_token_id,
        teacher=t_tok.pad_token_id,
    )
    batches = list(batches)
    assert (batches[0].student.attention_mask == 0).any() or (batches[0].teacher.attention_mask == 0).any()
    got = agreement_metrics(
        student, teacher, batches, mapping, len(s_tok) if not cross else None, chunk_size=7
    )
    top1, overlap, kl, positions = _direct(student, teacher, windows, mapping, len(s_tok), 5)
    assert got["kl_kind"] == (PROJECTED_KL if cross else EXACT_KL)
    assert got["positions"] == positions and got["unscored_positions"] == 0
    assert 0 <= got["top1_agreement"] <= 1 and 0 <= got["top_k_overlap"] <= 1 and got["kl"] > 0
    assert got["top1_agreement"] == pytest.approx(top1, rel=1e-6)
    assert got["top_k_overlap"] == pytest.approx(overlap, rel=1e-6)
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
