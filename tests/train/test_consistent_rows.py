"""`distill.projection_rows: consistent`: KD only at the group ends where the teacher's next token projects
onto the student's next token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sakd.curriculum import CurriculumSpec, curriculum_at
from sakd.losses import Chunking
from sakd.losses.kd import KDSettings, logit_kd
from sakd.losses.vocab_mapping import token_surfaces
from sakd.models.load import load_model
from sakd.train.objective import DistillObjective
from sakd.train.rows import LossNorm, TokenCounts
from sakd.train.teacher import LiveTeacher, consistent_rows


def _text(surface) -> bytes:
    return surface.encode() if isinstance(surface, str) else (surface or b"")


def test_consistent_rows_are_those_whose_next_tokens_agree(cross_setup):
    teacher, teacher_tok, student_tok, batch = cross_setup
    kd = logit_kd(KDSettings(consistent_rows=True), teacher_tok, student_tok)
    rows, n = batch.rows, batch.rows.student.shape[0]
    k = rows.teacher.shape[0]
    weights = consistent_rows(batch, rows, kd.mapping.teacher_to_student, n)
    assert weights.shape == (n,) and not weights[k:].any()
    teacher_next = batch.teacher.labels.flatten()[rows.teacher].tolist()
    student_next = batch.student.labels.flatten()[rows.student[:k]].tolist()
    t_text, s_text = token_surfaces(teacher_tok), token_surfaces(student_tok)
    for agree, t, s in zip(weights[:k].tolist(), teacher_next, student_next, strict=True):
        # where they agree, the student's next token is the start of the teacher's next token's text
        if agree:
            assert _text(t_text[t]).startswith(_text(s_text[s])), (t_text[t], s_text[s])
        else:
            assert t == -100 or int(kd.mapping.teacher_to_student[t]) != s
    assert 0 < weights[:k].sum() < k  # both kinds occur: the test sees the filter at work


def test_objective_runs_kd_only_at_consistent_rows(cross_setup, assets):
    teacher, teacher_tok, student_tok, batch = cross_setup
    student = load_model(str(assets["student"]), "student")
    point = curriculum_at(0.0, CurriculumSpec(weights={"token_weighting": 0.0}))
    norm = LossNorm(TokenCounts.of([batch]))

    def parts(consistent: bool, mapping=None):
        kd = logit_kd(KDSettings(consistent_rows=consistent), teacher_tok, student_tok)
        if mapping is not None:
            kd = dataclasses.replace(kd, mapping=dataclasses.replace(kd.mapping, teacher_to_student=mapping))
        objective = DistillObjective(LiveTeacher(teacher, kd), Chunking(64))
        with torch.no_grad():
            return objective(student, batch, point, norm)[1]

    every, consistent = parts(False), parts(True)
    assert 0 < float(consistent["kd"]) < float(every["kd"])
    assert float(consistent["lm"]) == pytest.approx(float(every["lm"]))  # the LM loss keeps every row
    # A mapping under which no teacher token projects onto any student label: no row runs KD.
    nowhere = torch.full((len(teacher_tok),), -1, dtype=torch.long)
    assert float(parts(True, nowhere)["kd"]) == 0.0
