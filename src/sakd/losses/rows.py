"""Row losses for `chunked_head_loss`: next-token cross-entropy, the distillation row loss against a teacher
given by its hidden states (live), and against a teacher given by its cached top-k.

Every part is a SUM over the chunk's rows; the caller divides by its global count of valid tokens. A chunk
with nothing valid gives exactly 0, never NaN.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sakd.losses.chunked import RowLoss
from sakd.models.head import ModelHead, as_head, head_logits

IGNORE_INDEX = -100

KDRowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SparseKDRowFn = Callable[..., torch.Tensor]  # (logits, ids, probs, tail, *, student_logprobs=None) -> (n,)


def lm_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"lm": summed cross-entropy over labels != -100}. logits (n, V), labels (n,) -> scalar."""
    return {"lm": F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")}


def make_distill_row_loss(
    kd: KDRowFn | None,
    teacher_head: ModelHead | torch.Tensor | None,
    teacher_bias: torch.Tensor | None = None,
) -> RowLoss:
    """A row loss with row_inputs (labels (N,), teacher_hidden (N, H_t), kd_mask (N,) bool, kd_weight (N,)).

    Returns {"lm": CE sum over labels != -100, "kd": sum over kd_mask rows of kd_weight * kd(student,
    teacher)} where kd maps (student_logits (k, V_s) fp32, teacher_logits (k, V_t) fp32) to (k,), e.g. a
    partial of a divergence or a cross-vocabulary loss. Teacher logits: `teacher_head` (a `ModelHead`, or a
    bare weight with `teacher_bias`) applied to teacher_hidden, computed without grad in the weight's dtype
    and upcast to fp32, only for the kd rows of the chunk, so the teacher's full logits never exist either.
    With kd None only "lm" is returned. `kd_rows` (host int): the kd rows are the chunk's first `kd_rows` (see
    `kd_selection`).
    """
    if kd is not None and teacher_head is None:
        raise ValueError("a kd loss needs the teacher's LM-head weight")
    teacher = None if teacher_head is None else as_head(teacher_head, teacher_bias)

    def row_loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_hidden: torch.Tensor,
        kd_mask: torch.Tensor,
        kd_weight: torch.Tensor,
        kd_rows: int | None = None,
    ) -> dict[str, torch.Tensor]:
        parts = lm_row_loss(logits, labels)
        if kd is None:
            return parts
        rows = kd_selection(kd_mask, kd_rows)
        if kd_count(rows) == 0:
            parts["kd"] = logits.new_zeros((), dtype=torch.float32)
            return parts
        student_rows = logits[rows]
        with torch.no_grad():
            teacher_logits = head_logits(teacher_hidden[rows].to(teacher.weight.dtype), teacher)
        per_row = kd(student_rows.float(), teacher_logits)  # (k,)
        parts["kd"] = (kd_weight[rows].float() * per_row).sum()
        return parts

    return row_loss


def kd_selection(kd_mask: torch.Tensor, kd_rows: int | None) -> slice | torch.Tensor:
    """A chunk's KD rows, for indexing: the first `kd_rows` when the caller put them first (a slice: nothing
    waits for the device and nothing is copied), else the rows where `kd_mask` is True (a slice of all rows
    when every row is one: a gather would copy the (n, V) logits and its backward would be a slow scatter)."""
    if kd_rows is not None:
        return slice(0, kd_rows)
    if bool(kd_mask.all()):
        return slice(0, kd_mask.shape[0])
    return kd_mask.nonzero().squeeze(-1)


def kd_count(rows: slice | torch.Tensor) -> int:
    return rows.stop if isinstance(rows, slice) else rows.numel()


def make_cached_distill_row_loss(kd: SparseKDRowFn | None) -> RowLoss:
    """A row loss with row_inputs (labels (N,), teacher_ids (N, k), teacher_probs (N, k), teacher_tail (N,),
    kd_mask (N,) bool, kd_weight (N,)): the cached-teacher twin of `make_distill_row_loss`.

    Returns {"lm": CE sum, "kd": sum over kd_mask rows of kd_weight * kd(student_logits (n, V_s) fp32, ids,
    probs, tail)} with kd e.g. a partial of `sparse_teacher_divergence`, which must give a finite 0 (and
    finite gradients) on rows without teacher mass (ids, probs, tail all 0); with kd None only "lm".
    """

    def row_loss(
        logits: torch.Tensor,
        labels: torch.Tensor,
        teacher_ids: torch.Tensor,
        teacher_probs: torch.Tensor,
        teacher_tail: torch.Tensor,
        kd_mask: torch.Tensor,
        kd_weight: torch.Tensor,
        kd_rows: int | None = None,  # not needed: every row is evaluated
    ) -> dict[str, torch.Tensor]:
        if kd is None:
            return lm_row_loss(logits, labels)
        # one log-softmax for both parts (cross_entropy is nll_loss of log_softmax)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (n, V)
        parts = {"lm": F.nll_loss(logprobs, labels, ignore_index=IGNORE_INDEX, reduction="sum")}
        # Every row is evaluated (rows without a teacher, all zeros, give 0): selecting the kd rows would cost
        # an index copy of the logits and a slow index_put in its backward.
        per_row = kd(logits, teacher_ids, teacher_probs, teacher_tail, student_logprobs=logprobs)  # (n,)
        parts["kd"] = torch.where(kd_mask, kd_weight.float() * per_row, 0.0).sum()
        return parts

    return row_loss
