"""The rows of a micro-batch that carry a loss, and the counts that normalise the loss sums."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sakd.data.batch import Batch, LossRows
from sakd.losses.rows import IGNORE_INDEX


@dataclass
class TokenCounts:
    """Global (all micro-batches of one optimizer step, all processes) counts that normalise the loss sums."""

    lm: int
    kd: int

    @staticmethod
    def of(batches: list[Batch]) -> TokenCounts:
        lm = sum(int((b.lm_labels() != IGNORE_INDEX).sum()) for b in batches)
        kd = sum(int(b.alignment.mask.sum()) for b in batches if b.alignment is not None)
        return TokenCounts(lm, kd)


@dataclass(frozen=True)
class LossNorm:
    """How one micro-batch's loss sums are normalised: by the step's global counts, times the number of
    processes for token-level parts (DDP averages gradients); batch-level parts are divided by the number of
    micro-batches."""

    counts: TokenCounts
    processes: int = 1
    micro_batches: int = 1

    def token_weight(self, weight: float, count: int) -> float:
        """The factor of a token-level part's sum: its curriculum weight over its global count."""
        return self.processes * weight / max(count, 1)


def loss_rows(batch: Batch) -> LossRows:
    """The rows the objective's chunked loss runs on, as flat indices, best computed on the host (`prepare_batch`)
    so that the device never selects rows by mask (each such selection waits for the device).

    `student` (N,): the student positions b * Ls + s that carry a label, the K distillation rows first (the
    ends of aligned groups, in (b, g) order), then the others; `teacher` (K,): the teacher position
    b * Lt + t of each distillation row's group; `group` (K,): that group, b * G + g (the cached teacher's
    rows). Without alignment K = 0."""
    labels = batch.student.labels  # (B, Ls)
    length = labels.shape[1]
    valid = (labels != IGNORE_INDEX).flatten()
    empty = torch.zeros(0, dtype=torch.long, device=labels.device)
    if batch.alignment is None:
        return LossRows(valid.nonzero().squeeze(-1), empty, empty)
    align = batch.alignment
    mask = align.mask  # (B, G)
    bi, gi = mask.nonzero(as_tuple=True)
    student = bi * length + align.student_pos[bi, gi]
    teacher = bi * batch.teacher.input_ids.shape[1] + align.teacher_pos[bi, gi]
    keep = valid[student]  # every aligned group ends at a labelled position, unless a caller cut its labels
    distilled = torch.zeros_like(valid)
    distilled[student[keep]] = True
    others = (valid & ~distilled).nonzero().squeeze(-1)
    return LossRows(torch.cat([student[keep], others]), teacher[keep], (bi * mask.shape[1] + gi)[keep])


def with_loss_rows(batch: Batch) -> Batch:
    """The batch with its `loss_rows`, where they are computed (`prepare_batch` does this on the host)."""
    return replace(batch, rows=loss_rows(batch))
