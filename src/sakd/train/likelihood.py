"""The chunk-likelihood term's inputs for one micro-batch: every student loss row's coefficient, from both
models' label log-probabilities over the aligned groups (`sakd.losses.chunk_likelihood`)."""

from __future__ import annotations

import torch

from sakd.data.batch import Batch, LossRows
from sakd.losses.chunk_likelihood import ChunkLikelihood, label_groups, label_logprobs
from sakd.losses.chunked import Chunking
from sakd.models.head import ModelHead
from sakd.train.teacher import Teacher, TeacherPass


def chunk_likelihood_rows(
    term: ChunkLikelihood,
    batch: Batch,
    rows: LossRows,
    student: tuple[torch.Tensor, ModelHead],
    teacher: tuple[Teacher, TeacherPass | None],
    chunking: Chunking,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients (N,) at `rows.student`, the term's sum over this micro-batch's matched groups).

    student: the student's final hidden states at the loss rows (N, Hs) and its head; teacher: the teacher
    and its pass over this micro-batch."""
    hidden, head = student
    labels = batch.student.labels  # (B, Ls)
    index = rows.student
    picked = label_logprobs(
        hidden, head.detach(), labels.flatten().index_select(0, index), chunking.rows(head)
    )
    student_lp = picked.new_zeros(labels.numel()).index_copy(0, index, picked).view_as(labels)  # (B, Ls)
    num_groups = batch.alignment.mask.shape[1]
    model, t_pass = teacher
    coefficients, total, _ = term.position_weights(
        (student_lp, label_groups(batch.student.group, labels, num_groups=num_groups)),
        (
            model.label_logprobs(batch, t_pass, chunking),
            label_groups(batch.teacher.group, batch.teacher.labels, num_groups=num_groups),
        ),
        num_groups,
    )
    return coefficients.flatten().index_select(0, index), total
