"""Row losses for `chunked_head_loss`: next-token cross-entropy and the standard distillation row loss.

Every part is a SUM over the chunk's rows; the caller divides by its global count of valid tokens. A chunk
with nothing valid gives exactly 0, never NaN.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sakd.losses.chunked import RowLoss

IGNORE_INDEX = -100

KDRowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lm_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"lm": summed cross-entropy over labels != -100}. logits (n, V), labels (n,) -> scalar."""
    return {"lm": F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")}


def make_distill_row_loss(
    kd: KDRowFn | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None = None,
) -> RowLoss:
    """A row loss with row_inputs (labels (N,), teacher_hidden (N, H_t), kd_mask (N,) bool, kd_weight (N,)).

    Returns {"lm": CE sum over labels != -100, "kd": sum over kd_mask rows of kd_weight * kd(student, teacher)}
    where kd maps (student_logits (k, V_s) fp32, teacher_logits (k, V_t) fp32) to (k,), e.g. a partial of a
    divergence or a cross-vocabulary loss. Teacher logits = teacher_hidden @ teacher_weight.T (+ bias),
    computed without grad in the teacher weight's dtype and upcast to fp32, only for the kd rows of the chunk,
    so the teacher's full logits never exist either. With kd None only "lm" is returned.
    """
    if kd is not None and teacher_weight is None:
        raise ValueError("a kd loss needs the teacher's LM-head weight")

    def row_loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_hidden: torch.Tensor,
        kd_mask: torch.Tensor,
        kd_weight: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        parts = lm_row_loss(logits, labels)
        if kd is None:
            return parts
        rows = kd_mask.nonzero().squeeze(-1)  # (k,)
        if rows.numel() == 0:
            parts["kd"] = logits.new_zeros((), dtype=torch.float32)
            return parts
        with torch.no_grad():
            teacher_hidden_rows = teacher_hidden[rows].to(teacher_weight.dtype)
            if teacher_bias is None:
                teacher_logits = teacher_hidden_rows @ teacher_weight.T
            else:
                teacher_logits = torch.addmm(teacher_bias, teacher_hidden_rows, teacher_weight.T)
        per_row = kd(logits[rows].float(), teacher_logits.float())  # (k,)
        parts["kd"] = (kd_weight[rows].float() * per_row).sum()
        return parts

    return row_loss
