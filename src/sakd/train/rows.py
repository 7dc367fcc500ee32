"""The rows of a micro-batch that carry a loss, and the counts that normalise the loss sums."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sakd.losses.rows import IGNORE_INDEX


@dataclass
class TokenCounts:
    """Global (all micro-batches of one optimizer step, all processes) counts that normalise the loss sums."""

    lm: int
    kd: int

    @staticmethod
    def of(batches: list[dict[str, torch.Tensor]]) -> TokenCounts:
        lm = sum(int((b["student_labels"] != IGNORE_INDEX).sum()) for b in batches)
        kd = sum(int(b["align_mask"].sum()) for b in batches if "align_mask" in b)
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


def loss_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows the objective's chunked loss runs on, as flat indices, best computed on the host (`prepare_batch`)
    so that the device never selects rows by mask (each such selection waits for the device).

    `rows_student` (N,): the student positions b * Ls + s that carry a label, the K distillation rows first
    (the ends of aligned groups, in (b, g) order), then the others; `rows_teacher` (K,): the teacher position
    b * Lt + t of each distillation row's group; `rows_group` (K,): that group, b * G + g (the cached teacher's
    rows). Without alignment K = 0."""
    labels = batch["student_labels"]  # (B, Ls)
    length = labels.shape[1]
    valid = (labels != IGNORE_INDEX).flatten()
    empty = torch.zeros(0, dtype=torch.long, device=labels.device)
    if "align_mask" not in batch:
        return {"rows_student": valid.nonzero().squeeze(-1), "rows_teacher": empty, "rows_group": empty}
    mask = batch["align_mask"]  # (B, G)
    bi, gi = mask.nonzero(as_tuple=True)
    student = bi * length + batch["align_student_pos"][bi, gi]
    teacher = bi * batch["teacher_input_ids"].shape[1] + batch["align_teacher_pos"][bi, gi]
    keep = valid[student]  # every aligned group ends at a labelled position, unless a caller cut its labels
    distilled = torch.zeros_like(valid)
    distilled[student[keep]] = True
    others = (valid & ~distilled).nonzero().squeeze(-1)
    return {
        "rows_student": torch.cat([student[keep], others]),
        "rows_teacher": teacher[keep],
        "rows_group": (bi * mask.shape[1] + gi)[keep],
    }
