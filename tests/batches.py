"""Batches built by hand for tests that need no collated windows."""

from __future__ import annotations

import torch

from sakd.data.batch import Batch, Side


def side_of(input_ids: torch.Tensor, **fields: torch.Tensor) -> Side:
    """A `Side` of these (B, L) ids; a field not given is neutral: no padding, no labels, no groups."""
    neutral = {
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.full_like(input_ids, -100),
        "target_bytes": torch.zeros_like(input_ids),
        "group": torch.full_like(input_ids, -1),
    }
    return Side(input_ids, **{**neutral, **fields})


def batch_of(student_ids: torch.Tensor, teacher_ids: torch.Tensor | None = None, **parts) -> Batch:
    """A `Batch` of one window per row with neutral sides of these ids; `parts` (alignment, rows, cache)
    are passed on as they are."""
    teacher = side_of(teacher_ids) if teacher_ids is not None else None
    return Batch(side_of(student_ids), torch.arange(student_ids.shape[0]), teacher, **parts)
