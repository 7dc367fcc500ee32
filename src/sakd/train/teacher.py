"""The teacher, as the distillation objective sees it: one interface, two implementations.

- `LiveTeacher`: the frozen model runs on each micro-batch; KD compares logits computed chunk by chunk from its
  final hidden state, and the auxiliary losses may read its other states (`TeacherPass`).
- `TopKTeacher`: a teacher cache; each batch carries the cached top-k distribution of its aligned groups
  (`sakd.cache.training`), and KD is the sparse divergence on them. It has no hidden states to give.

Both give, for the loss rows of a micro-batch, the KD row inputs and the row loss at temperature T, and, for
the aligned groups, the knowledge gap (the detached per-group KD). Nothing outside this module asks which one
it holds.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from sakd.curriculum import CurriculumPoint
from sakd.data.batch import Batch, LossRows
from sakd.errors import UserError
from sakd.losses.chunk_likelihood import label_logprobs
from sakd.losses.chunked import Chunking, RowLoss
from sakd.losses.kd import LogitKD, TopKKD
from sakd.losses.rows import IGNORE_INDEX
from sakd.models.attention import capture_attentions
from sakd.models.head import ModelHead, model_head
from sakd.models.load import NO_LOGITS, capture_final_hidden, unwrap
from sakd.router import chunked_gap, knowledge_gap


@dataclass
class TeacherPass:
    hidden: torch.Tensor  # (B, Lt, Ht) final hidden state
    sources: torch.Tensor | None = None  # (B, Lt, E, Ht) knowledge sources
    attention: torch.Tensor | None = None  # (B, heads, Lt, Lt) last-layer attention
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, 0 = embeddings


@dataclass(frozen=True)
class TeacherRequest:
    """What one micro-batch needs from the teacher's forward besides its final hidden state."""

    sources: Any = None  # the knowledge-source capture (`sakd.models.experts`), entered around the forward
    attention: bool = False
    hidden_states: bool = False


@torch.no_grad()
def teacher_pass(
    teacher: nn.Module,
    batch: Batch,
    sources=None,
    attention: bool = False,
    hidden_states: bool = False,
) -> TeacherPass:
    """The frozen teacher's forward: final hidden state, and on request knowledge sources, last-layer
    attention and every layer's hidden states, all captured without editing the model."""
    with ExitStack() as stack:
        t_out = stack.enter_context(capture_final_hidden(teacher))
        if sources is not None:
            stack.enter_context(sources)
        attn = stack.enter_context(capture_attentions(unwrap(teacher), detach=True)) if attention else None
        result = teacher(
            input_ids=batch.teacher.input_ids,
            attention_mask=batch.teacher.attention_mask,
            logits_to_keep=NO_LOGITS,
            use_cache=False,
            output_hidden_states=hidden_states,
        )
        return TeacherPass(
            hidden=t_out["hidden"],
            sources=sources.sources if sources is not None else None,
            attention=attn.maps[0] if attn is not None else None,
            hidden_states=result.hidden_states if hidden_states else None,
        )


class Teacher(Protocol):
    kind: str  # what KD compares, for the log
    model: nn.Module | None  # the model, when it runs (the auxiliary losses read its states)

    def run(self, batch: Batch, request: TeacherRequest) -> TeacherPass | None:
        """The teacher's states for this micro-batch (None: it has none to give)."""

    def kd_inputs(
        self,
        batch: Batch,
        rows: LossRows,
        t_pass: TeacherPass | None,
        n: int,
    ) -> list[torch.Tensor]:
        """The row inputs the row loss reads after the labels, for the first `rows.teacher` rows
        (the distillation rows), zero-filled up to `n` rows."""

    def row_loss(self, point: CurriculumPoint, student_head: ModelHead) -> RowLoss:
        """The chunked row loss (parts "lm" and "kd") at the curriculum point (its temperature and progress)."""

    def chunk_heads(self) -> tuple[ModelHead, ...]:
        """The teacher heads a chunk of the row loss applies (they bound the chunk's rows)."""

    def knowledge_gap(
        self,
        student_rows: torch.Tensor,
        student_head: ModelHead,
        batch: Batch,
        t_pass: TeacherPass | None,
        point: CurriculumPoint,
        chunking: Chunking,
    ) -> torch.Tensor:
        """The detached per-row KD (N,) at the aligned groups of `batch.alignment.mask` in (b, g) order;
        `student_rows` (N, Hs) are the student's final hidden states there."""

    def label_logprobs(self, batch: Batch, t_pass: TeacherPass | None, chunking: Chunking) -> torch.Tensor:
        """The teacher's log-probability of each of its next tokens, fp32 (B, Lt) (0 where there is none)."""

    def kd_row_weights(self, batch: Batch, rows: LossRows, n: int) -> torch.Tensor | None:
        """A factor (n,) on each distillation row's KD (zeros after the first `rows.teacher` rows), or None:
        every row at full weight."""


def aligned_rows(batch: Batch, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position) of each aligned group's last token on `side`, in (b, g) order."""
    align = batch.alignment
    mask = align.mask  # (B, G)
    bi = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    return bi, (align.teacher_pos if side == "teacher" else align.student_pos)[mask]


def first_rows(values: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """values[index] (K, ...) followed by zeros up to `rows` rows."""
    picked = values.index_select(0, index)
    return torch.cat([picked, picked.new_zeros((rows - picked.shape[0], *picked.shape[1:]))])


def consistent_rows(batch: Batch, rows: LossRows, teacher_to_student: torch.Tensor, n: int) -> torch.Tensor:
    """1 at each distillation row where the teacher's next token projects onto the student's next token (as
    `VocabMapping.teacher_to_student` maps it), 0 at the others and after the first `rows.teacher` rows (n,).
    Computed on the device, without waiting for it."""
    k = rows.teacher.shape[0]
    teacher_next = batch.teacher.labels.flatten().index_select(0, rows.teacher)  # (K,)
    student_next = batch.student.labels.flatten().index_select(0, rows.student[:k])  # (K,)
    projected = teacher_to_student.to(teacher_next.device)[teacher_next.clamp_min(0)]
    agree = (projected == student_next) & (teacher_next != IGNORE_INDEX)
    return torch.cat([agree.float(), agree.new_zeros(n - k, dtype=torch.float32)])


class LiveTeacher:
    """The teacher model itself, run on every micro-batch that needs it."""

    def __init__(self, model: nn.Module, kd: LogitKD):
        self.model = model
        self.kd = kd
        self.kind = kd.kind
        self.mapping = kd.mapping

    def run(self, batch: Batch, request: TeacherRequest) -> TeacherPass:
        return self.teacher_pass(self.model, batch, request.sources, request.attention, request.hidden_states)

    def kd_inputs(self, batch, rows, t_pass, n):
        return [first_rows(t_pass.hidden.flatten(0, 1), rows.teacher, n)]

    def row_loss(self, point: CurriculumPoint, student_head: ModelHead) -> RowLoss:
        width = student_head.weight.shape[0]
        return self.kd.row_loss(point.temperature, model_head(self.model), width, point.progress)

    def chunk_heads(self) -> tuple[ModelHead, ...]:
        return (model_head(self.model),)

    def knowledge_gap(self, student_rows, student_head, batch, t_pass, point, chunking):
        bi, positions = aligned_rows(batch, "teacher")
        t_head = model_head(self.model)
        return knowledge_gap(
            student_rows,
            t_pass.hidden[bi, positions],
            student_head.detach(),
            t_head,
            self.kd.at(point.temperature, point.progress),
            chunking.rows(student_head, t_head),
        )

    def label_logprobs(self, batch, t_pass, chunking):
        labels = batch.teacher.labels  # (B, Lt); every position, padding too: no selection waits
        head = model_head(self.model)
        flat = label_logprobs(t_pass.hidden.flatten(0, 1), head, labels.flatten(), chunking.rows(head))
        return flat.view_as(labels)

    def kd_row_weights(self, batch, rows, n):
        settings = self.kd.settings
        if self.mapping is None or settings is None or not settings.consistent_rows:
            return None
        return consistent_rows(batch, rows, self.mapping.teacher_to_student, n)

    # the forward, as a class attribute so that tests can stand in for it
    teacher_pass = staticmethod(teacher_pass)


class TopKTeacher:
    """A teacher known by its cached top-k distributions, which each batch carries (`Batch.cache`)."""

    model = None

    def __init__(self, kd: TopKKD):
        self.kd = kd
        self.kind = kd.kind
        self.mapping = kd.mapping

    def run(self, batch, request) -> None:
        return None

    def kd_inputs(self, batch, rows, t_pass, n):
        return [first_rows(t.flatten(0, 1), rows.group, n) for t in batch.cache.tensors()]

    def row_loss(self, point: CurriculumPoint, student_head: ModelHead) -> RowLoss:
        return self.kd.row_loss(point.temperature, point.progress)

    def chunk_heads(self) -> tuple[ModelHead, ...]:
        return ()

    def label_logprobs(self, batch, t_pass, chunking):
        raise UserError(
            "a teacher cache holds the teacher's top-k at group ends only, not the log-probability of every "
            "teacher token that the chunk-likelihood term needs: set distill.chunk_likelihood_weight: 0, or "
            "train with the live teacher"
        )

    def kd_row_weights(self, batch, rows, n):
        return None  # the cache's rows were captured whole; their selection is the capture's

    def knowledge_gap(self, student_rows, student_head, batch, t_pass, point, chunking):
        teacher = [t[batch.alignment.mask] for t in batch.cache.tensors()]
        kd = self.kd.at(point.temperature, point.progress)
        return chunked_gap(student_rows, student_head, teacher, kd, chunking.rows(student_head))
