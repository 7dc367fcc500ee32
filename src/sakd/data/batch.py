"""A training micro-batch, typed: each part is filled by the code that owns it.

Collation (`sakd.data.packing.collate_windows`) builds the two `Side`s, the `Alignment` and the window indices;
the loss rows (`LossRows`) are added where a batch is prepared for the objective
(`sakd.train.step.prepare_batch`); a teacher cache attaches its `CachedTargets`
(`sakd.cache.training.CachedTeacher.attach`); on-policy distillation builds batches of the student's own text
and marks what it `sampled` (`sakd.data.sampled`). Each step returns a new batch (`dataclasses.replace`), so a
batch handed out is never changed behind its holder's back.

The classes compare by identity (`eq=False`): tensors have no single truth value to compare with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch

IGNORE_INDEX = -100  # a position without a label


@dataclass(frozen=True, eq=False)
class Side:
    """One model's tokens of the batch's windows, (B, L) int64 each, L that model's padded length."""

    input_ids: torch.Tensor  # its prefix tokens, the window's tokens, then padding
    attention_mask: torch.Tensor | None  # None: no padding (a prepared batch leaves a full mask out)
    labels: torch.Tensor  # already shifted: position i predicts the token at i + 1; -100: no label
    target_bytes: torch.Tensor  # UTF-8 bytes of each label token; 0 where there is no label
    group: torch.Tensor  # alignment group of each token (0..G-1 in its window); -1 outside every group


@dataclass(frozen=True, eq=False)
class Alignment:
    """The aligned groups of a two-tokenizer batch, (B, G) each; padding groups point at position 0."""

    mask: torch.Tensor  # bool: a real group followed on both sides by the next one (it is distilled)
    student_pos: torch.Tensor  # int64: the position of the group's last student token
    teacher_pos: torch.Tensor  # int64: the position of the group's last teacher token


@dataclass(frozen=True, eq=False)
class LossRows:
    """The rows the objective's chunked loss runs on, as flat indices (`sakd.train.rows.loss_rows`)."""

    student: torch.Tensor  # (N,) student positions b * Ls + s with a label, the K distillation rows first
    teacher: torch.Tensor  # (K,) the teacher position b * Lt + t of each distillation row's group
    group: torch.Tensor  # (K,) that group, b * G + g


@dataclass(frozen=True, eq=False)
class CachedTargets:
    """A teacher cache's top-k distribution at each aligned group (zeros where none is cached)."""

    ids: torch.Tensor  # (B, G, k) int64 token ids
    probs: torch.Tensor  # (B, G, k) fp32 their probabilities
    tail: torch.Tensor  # (B, G) fp32 the probability mass outside the top k

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, probs, tail), in the order the top-k row loss reads them."""
        return self.ids, self.probs, self.tail


@dataclass(frozen=True, eq=False)
class Batch:
    """One micro-batch: the student's side, and with a teacher tokenization its side and the alignment."""

    student: Side
    window_index: torch.Tensor  # (B,) int64: each row's window in the packed list
    teacher: Side | None = None
    alignment: Alignment | None = None
    rows: LossRows | None = None  # set by `prepare_batch`
    cache: CachedTargets | None = None  # set by a teacher cache
    # (B, Ls) bool, set for text the student wrote (`sakd.data.sampled`): the labels it sampled itself.
    # They are distilled like any other, but carry no LM loss: the data did not write them.
    sampled: torch.Tensor | None = None

    def side(self, role: str) -> Side:
        """The side of `role`, "student" or "teacher"."""
        if role == "student":
            return self.student
        if role == "teacher" and self.teacher is not None:
            return self.teacher
        raise ValueError(f"the batch has no {role} side")

    def lm_labels(self) -> torch.Tensor:
        """(B, Ls) the student's labels that carry the LM loss: every label but those the student sampled."""
        labels = self.student.labels
        return labels if self.sampled is None else labels.masked_fill(self.sampled, IGNORE_INDEX)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every tensor moved to `device`."""
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Every tensor in pinned host memory, so that copying it to a GPU does not wait for the device."""
        return map_tensors(self, lambda t: t.pin_memory())

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(dotted name, tensor) of every tensor the batch holds, e.g. ("student.input_ids", ...)."""
        return _named_tensors(self, "")


def map_tensors(part: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of the dataclass `part` with `fn` applied to each of its tensors, nested parts included."""
    changes = {}
    for f in fields(part):
        value = getattr(part, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = fn(value)
        elif is_dataclass(value):
            changes[f.name] = map_tensors(value, fn)
    return replace(part, **changes)


def _named_tensors(part: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    for f in fields(part):
        value = getattr(part, f.name)
        if isinstance(value, torch.Tensor):
            yield prefix + f.name, value
        elif is_dataclass(value):
            yield from _named_tensors(value, f"{prefix}{f.name}.")
