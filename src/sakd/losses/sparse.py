"""Divergences against a teacher known only by its top-k tokens and the mass of the rest (the teacher cache).

The k + 1 buckets (each top-k token, and everything else as one "tail") are compared as distributions; see
`sparse_teacher_divergence`. `sakd.losses.fused` reuses the forward-KL terms for its closed-form gradient.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sakd.losses.divergence import divergence_from_logprobs, student_logprobs_at


@dataclass(frozen=True)
class SparseTeacherSettings:
    """What `sparse_teacher_divergence` takes of the run, beyond each call's rows: the divergence, and how the
    cached teacher's ids meet the student's logit columns (one of `student_vocab`, `teacher_to_student`)."""

    teacher_vocab_size: int
    """The teacher tokenizer's size: at T != 1 the tail is spread over its tokens outside the top-k."""
    name: str = "forward_kl"
    """A divergence of `divergence_from_logprobs`."""
    student_vocab: int | None = None
    """Same vocabulary: the student's real columns (the softmax runs over its first `student_vocab`)."""
    teacher_to_student: torch.Tensor | None = None
    """Different vocabularies: (V_t,) the student id of each teacher id, -1 unmapped."""


def sparse_teacher_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_tail: torch.Tensor,
    temperature: float,
    *,
    settings: SparseTeacherSettings,
    beta: float = 0.5,
    student_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """A divergence against a teacher known only by its top-k: ids (n, k), probs (n, k) at temperature 1, and
    the mass of the rest, tail (n,). student_logits (n, W) -> (n,) fp32.

    The approximation: both distributions are compared on k + 1 buckets, the teacher's top-k tokens one by one
    and everything else as one "tail" bucket, e.g. for forward KL
        sum_{i in top-k} p_i (log p_i - log q_i) + tail * (log tail - log(1 - sum_{i in top-k} q_i)),
    which is a lower bound of the full KL (merging tokens never increases it) and equals it when k covers the
    vocabulary (tail = 0). Any divergence of `divergence_from_logprobs` is evaluated on the buckets, with its
    usual T^2 scaling. At temperature T != 1 the top-k become p_i^(1/T) and the tail is taken as spread evenly
    over the teacher's other V_t - k tokens, then everything is renormalised (exact at T = 1 and when k = V_t).

    Same vocabulary (`teacher_to_student` None): the student's softmax runs over its first `student_vocab`
    columns (the tokenizer; padding columns are not tokens), as in the live same-vocabulary loss. Different
    vocabularies: each top-k token's mass goes to its student id (`teacher_to_student` (V_t,), -1 unmapped: that
    mass is dropped and the rest renormalised, as `projected_teacher_probs` does), the tail is kept as the
    teacher's mass on student tokens outside the projected ids, and every student column takes part. A row
    with no teacher mass at all gives 0. `student_logprobs` (n, W'): log_softmax of all of `student_logits`,
    when the caller has it (the LM loss does); forward KL at temperature 1 reuses it when W' = W.
    """
    to_student = settings.teacher_to_student
    logp, log_tail, targets = sparse_teacher_buckets(
        teacher_ids, teacher_probs, teacher_tail, temperature, settings.teacher_vocab_size, to_student
    )
    if to_student is None:
        student_logits = student_logits[:, : settings.student_vocab]
    if settings.name == "forward_kl":
        width = student_logits.shape[-1]
        if student_logprobs is None or temperature != 1.0 or student_logprobs.shape[-1] != width:
            scaled = student_logits.float() if temperature == 1.0 else student_logits.float() / temperature
            student_logprobs = F.log_softmax(scaled, dim=-1)
        return _sparse_forward_kl(student_logprobs, targets, logp, log_tail, temperature)
    return _bucket_divergence(student_logits, targets, logp, log_tail, temperature, settings.name, beta)


def sparse_teacher_buckets(
    teacher_ids: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_tail: torch.Tensor,
    temperature: float,
    teacher_vocab_size: int,
    teacher_to_student: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cached teacher at temperature T: log-probabilities of the top-k (n, k) and of the tail (n,), and
    the student column of each top-k entry (n, k) (-1: unmapped), as `sparse_teacher_divergence` uses them."""
    logp = teacher_probs.float().log()  # (n, k), -inf where a probability is 0
    log_tail = teacher_tail.float().log()  # (n,)
    if temperature != 1.0:
        spread = math.log(max(teacher_vocab_size - teacher_ids.shape[-1], 1))
        logp = logp / temperature
        log_tail = spread + (log_tail - spread) / temperature
    if teacher_to_student is None:
        targets = teacher_ids.long()
    else:
        targets = teacher_to_student.to(teacher_ids.device)[teacher_ids.long()]  # (n, k), -1 unmapped
    return logp, log_tail, targets


def _bucket_divergence(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    temperature: float,
    name: str,
    beta: float,
) -> torch.Tensor:
    """Any divergence on the k + 1 buckets, laid out densely: (n, W + 1) teacher and student log-probabilities
    (the student's columns, -inf outside the top-k's, then the tail bucket). targets (n, k) student columns
    (-1: unmapped), logp (n, k) and log_tail (n,) the teacher's (tempered, unnormalised) buckets."""
    n, width = student_logits.shape
    # Unmapped ids go to one extra column that is then cut off.
    targets = torch.where(targets >= 0, targets, width)
    teacher = logp.new_zeros(n, width + 1).scatter_add_(1, targets, logp.exp())[:, :width]  # (n, W)
    member = torch.zeros((n, width + 1), dtype=torch.bool, device=targets.device)
    member = member.scatter_(1, targets, True)[:, :width]  # (n, W) the top-k's columns
    no_rest = member.all(-1)  # (n,) the top-k cover every student column: nothing is left for the tail
    tail = torch.where(no_rest, 0.0, log_tail.exp())
    no_mass = teacher.sum(-1) + tail == 0
    # A top-k probability stored as 0 (float16 underflow) would make reverse KL infinite: floor it.
    teacher = torch.where(member & ~no_mass[:, None], teacher.clamp_min(1e-12), teacher)
    total = torch.where(no_mass, 1.0, teacher.sum(-1) + tail)
    teacher_buckets = torch.cat([teacher, tail[:, None]], dim=-1) / total[:, None]  # (n, W + 1)

    student = student_logprobs_at(student_logits, temperature)  # (n, W)
    # All-(-inf) rows would give logsumexp a NaN gradient: those rows have no tail bucket anyway.
    rest = torch.where(no_rest[:, None], 0.0, student.masked_fill(member, float("-inf")))
    student_tail = torch.where(no_rest, float("-inf"), torch.logsumexp(rest, dim=-1))  # (n,)
    student_buckets = torch.cat([student.masked_fill(~member, float("-inf")), student_tail[:, None]], dim=-1)
    # Rows without a teacher compare the student with itself: 0, with finite gradients for every divergence.
    teacher_log = torch.where(no_mass[:, None], student_buckets.detach(), teacher_buckets.log())
    rows = divergence_from_logprobs(name, student_buckets, teacher_log, temperature, beta)
    return torch.where(no_mass, 0.0, rows)


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x * x.clamp_min(1e-30).log(), 0.0)


def _sparse_forward_kl(
    student_logprobs: torch.Tensor,
    targets: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """`_bucket_divergence` for forward KL without any (n, W) tensor besides the student's log-softmax:
    sum_j P_j log P_j + tail log tail - sum_i P_i log q_(t_i) - tail log(1 - sum_(j in S) q_j), with P the
    projected teacher (duplicate targets add up), S the distinct targets, log(1 - sum q) a logsumexp over the
    columns outside S."""
    return _sparse_forward_kl_terms(student_logprobs, targets, logp, log_tail, temperature)[0]


def sort_rows(
    columns: torch.Tensor, width: int, vectorised: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `columns` (n, k) int64, values in [0, width], sorted ascending (ties keep their order), and
    the order (n, k) that sorts it, as `columns.sort(dim=-1, stable=True)` gives them.

    On CPU the rows are sorted as int32 keys column << b | position (b bits hold a position), which are
    distinct, so the sorted keys alone give both results. numpy sorts them with SIMD instructions: about 5x
    faster than torch's sort of rows this short (1.0 -> 0.2 ms for 1011 x 64, the conversions included).
    `vectorised=False`, another device or keys too wide for int32 take torch's sort."""
    k = columns.shape[-1]
    bits = max(k - 1, 1).bit_length()
    if not (vectorised and columns.device.type == "cpu" and (width + 1) << bits < 2**31):
        return columns.sort(dim=-1, stable=True)
    keys = columns.numpy().astype(np.int32) << bits | np.arange(k, dtype=np.int32)
    keys.sort(axis=-1)
    return torch.from_numpy(keys >> bits).long(), torch.from_numpy(keys & ((1 << bits) - 1)).long()


def _sparse_forward_kl_terms(
    student_logprobs: torch.Tensor,
    targets: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    temperature: float,
    own_columns: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`_sparse_forward_kl`'s rows (n,) and the terms of `sparse_kl_buckets` with rest_coef (n,): tail / (1 -
    sum_S q) where the tail has mass (else 0), which the closed-form gradient needs (`sakd.losses.fused`)."""
    terms = sparse_kl_buckets(student_logprobs, targets, logp, log_tail, own_columns)
    rows, terms["rest_coef"] = sparse_kl_rows(terms, log_mass_outside(student_logprobs, terms), temperature)
    return rows, terms


def sparse_kl_buckets(
    student_logprobs: torch.Tensor,
    targets: torch.Tensor,
    logp: torch.Tensor,
    log_tail: torch.Tensor,
    own_columns: bool = False,
) -> dict[str, torch.Tensor]:
    """Everything of `_sparse_forward_kl` but the student's mass outside S: entry_p (n, k) teacher probability
    of each top-k entry (0 unmapped), column (n, k) its student column (clamped), member_column (n, k) columns
    of S only (every column of S at least once) where has_members (n,), keep_outside (n,) rows where marking
    S leaves nothing (no member, or S is every column), tail_p (n,) the teacher's normalised tail, no_mass
    (n,) rows without teacher mass, partial_rows (n,) the KL without the -tail_p log(1 - q(S)) term.

    `own_columns`: every target is its own column (one vocabulary: a top-k never repeats an id), so the
    entries need no sorting to merge duplicates. Rows without teacher mass (all ids 0) may repeat; nothing
    of theirs reaches the loss or the gradient."""
    width = student_logprobs.shape[-1]
    mapped = targets >= 0
    mass = torch.where(mapped, logp.exp(), 0.0)  # (n, k) unnormalised teacher mass per top-k entry
    column = targets.clamp_min(0)
    if own_columns:
        sorted_columns, order = column, None
        distinct = (column < width) & mapped
    else:
        sorted_columns, order = sort_rows(targets.masked_fill(~mapped, width), width)  # unmapped last
        first = torch.ones_like(mapped)
        first[:, 1:] = sorted_columns[:, 1:] != sorted_columns[:, :-1]
        distinct = first & (sorted_columns < width)  # (n, k) the first entry of each distinct student column
    no_rest = distinct.sum(-1) == width
    tail = torch.where(no_rest, 0.0, log_tail.exp())
    total = mass.sum(-1) + tail
    no_mass = total == 0
    total = torch.where(no_mass, 1.0, total)
    segment = (distinct.cumsum(-1) - 1).clamp_min(0)  # unmapped entries (mass 0) join the last segment
    in_order = mass if order is None else mass.gather(1, order)
    merged = torch.zeros_like(mass).scatter_add_(1, segment, in_order) / total[:, None]  # (n, k)
    tail_p = tail / total
    entropy_part = _xlogx(merged).sum(-1) + _xlogx(tail_p)  # sum P log P over the buckets

    entry_p = mass / total[:, None]
    cross = (entry_p * student_logprobs.gather(1, column)).sum(-1)
    # Unmapped entries (sorted last) point at the row's first column, a member whenever the row has one, so
    # that marking S through member_column never hits a column outside S.
    has_members = sorted_columns[:, 0] < width
    member_column = torch.where(sorted_columns < width, sorted_columns, sorted_columns[:, :1])
    return {
        "entry_p": entry_p,
        "column": column,
        "member_column": member_column.clamp_max(width - 1),
        "has_members": has_members,
        "keep_outside": no_rest | ~has_members,
        "tail_p": tail_p,
        "no_mass": no_mass,
        "partial_rows": entropy_part - cross,
    }


def log_mass_outside(student_logprobs: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """log(1 - q(S)) (n,) as a logsumexp over the columns outside S (differentiable).

    1 - the sum of the probabilities on S loses every digit once the student leaves less than ~1e-7 outside
    S, which dropped the tail term (value and gradient) exactly where the student ignores the teacher's tail."""
    columns, keep = terms["member_column"], terms["keep_outside"][:, None]
    marked = torch.where(keep, student_logprobs.gather(1, columns), float("-inf"))
    return torch.logsumexp(student_logprobs.scatter(1, columns, marked), dim=-1)


@torch.no_grad()
def log_mass_outside_from_probs(student_probs: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """`log_mass_outside` from the probabilities (n, C) instead, without a copy: S is zeroed in place for the
    sum and restored. Exact while the columns outside S keep some fp32 mass (at least ~1e-38)."""
    columns, keep = terms["member_column"], terms["keep_outside"][:, None]
    on_members = student_probs.gather(1, columns)
    student_probs.scatter_(1, columns, torch.where(keep, on_members, 0.0))
    outside = student_probs.sum(-1)
    student_probs.scatter_(1, columns, on_members)
    return outside.clamp_min(torch.finfo(outside.dtype).tiny).log()


def sparse_kl_rows(
    terms: dict[str, torch.Tensor], log_rest: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (n,) of `_sparse_forward_kl` from `sparse_kl_buckets` and log(1 - q(S)) (n,), and tail / (1 -
    q(S)) (n,) where the tail has mass, else 0: huge when the student leaves almost nothing outside S (its
    exponent capped to stay finite in fp32)."""
    tail_p = terms["tail_p"]
    rows = terms["partial_rows"] - torch.where(tail_p > 0, tail_p * log_rest, 0.0)
    log_coef = (tail_p.log() - log_rest.detach()).clamp_max(_MAX_LOG_REST_COEF)
    rest_coef = torch.where(tail_p > 0, log_coef.exp(), 0.0)
    return torch.where(terms["no_mass"], 0.0, rows * temperature**2), rest_coef


_MAX_LOG_REST_COEF = 80.0
