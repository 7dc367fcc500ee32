"""Distillation losses between models with different tokenizers, per row, fp32.

Each loss takes student_logits (N, V_s_model) and teacher_logits (N, V_t_model) for aligned positions and
returns (N,). Model logit widths may exceed the tokenizer sizes (vocabularies padded to a multiple of 64/128):
teacher logits are sliced to mapping.teacher_vocab_size before the softmax (the padding columns are not
tokens), while every student column stays in the student's softmax (they are real outputs of the student,
merely never targeted). The teacher is a fixed target: its logits are detached.
"""

import torch
import torch.nn.functional as F

from sakd.errors import UserError
from sakd.losses.divergence import divergence_from_logprobs, student_logprobs_at
from sakd.losses.vocab_mapping import VocabMapping, build_vocab_mapping, token_surfaces

__all__ = [
    "CROSS_VOCAB_LOSSES",
    "VocabMapping",
    "build_vocab_mapping",
    "hybrid_loss",
    "projected_divergence",
    "projected_teacher_probs",
    "token_surfaces",
    "uld_loss",
]


def _teacher_logits(teacher_logits: torch.Tensor, mapping: VocabMapping, temperature: float) -> torch.Tensor:
    """Teacher logits / T over the teacher tokenizer's ids, fp32, detached. (N, V_t_model) -> (N, V_t)."""
    if teacher_logits.shape[-1] < mapping.teacher_vocab_size:
        raise UserError(
            f"teacher logits have {teacher_logits.shape[-1]} columns but the vocabulary mapping was built for a "
            f"teacher tokenizer of {mapping.teacher_vocab_size} tokens: the teacher model and tokenizer do not match"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return teacher_logits.detach()[..., : mapping.teacher_vocab_size].float() / temperature


def _check_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mapping: VocabMapping) -> None:
    if student_logits.shape[-1] < mapping.student_vocab_size:
        raise UserError(
            f"student logits have {student_logits.shape[-1]} columns but the vocabulary mapping was built for a "
            f"student tokenizer of {mapping.student_vocab_size} tokens: the student model and tokenizer do not match"
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must hold the same aligned rows"
        )


def projected_teacher_probs(
    teacher_logits: torch.Tensor,
    mapping: VocabMapping,
    temperature: float,
    student_width: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher probabilities at T summed onto student ids, renormalised. (N, V_t_model) -> (N, student_width).

    Mass on unmapped teacher tokens is dropped. A row whose mass is all unmapped (a teacher certain of a
    special token) comes back all zeros: there is nothing to distil there. `out`: an (N, student_width + 1)
    fp32 tensor to sum into (its last column holds the unmapped mass); the result is then a view of it.
    """
    probs = torch.softmax(_teacher_logits(teacher_logits, mapping, temperature), dim=-1)  # (N, V_t)
    targets = mapping.teacher_to_student.to(probs.device)
    # Unmapped tokens go to one extra column that is then cut off, which avoids copying the mapped columns.
    targets = torch.where(targets >= 0, targets, student_width)
    projected = probs.new_zeros(*probs.shape[:-1], student_width + 1) if out is None else out.zero_()
    projected.index_add_(-1, targets, probs)
    projected = projected[..., :student_width]
    total = projected.sum(-1, keepdim=True)
    # `total == 0` (not `total > 0`) so that a NaN teacher stays NaN and is caught, never zeroed.
    total = torch.where(total == 0, 1.0, total)
    return projected / total if out is None else projected.div_(total)


def projected_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mapping: VocabMapping,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """A divergence between the student and the teacher projected onto the student vocabulary. -> (N,).

    The projected teacher puts no mass on student tokens that no teacher token maps to, so reverse KL (and
    jsd with beta = 1, which is reverse KL, and akl, which weights in reverse KL) would be infinite on every
    row: those are refused.
    """
    if divergence in ("reverse_kl", "akl") or (divergence == "jsd" and beta == 1.0):
        raise UserError(
            f"{divergence} against a projected teacher is infinite (its reverse KL part meets the zero "
            "probability the projection gives to student tokens no teacher token maps to): use forward_kl, "
            "skew_kl, skew_rkl, jsd with beta < 1, taid or tvd"
        )
    _check_student(student_logits, teacher_logits, mapping)
    projected = projected_teacher_probs(teacher_logits, mapping, temperature, student_logits.shape[-1])
    no_mass = projected.sum(-1) == 0
    rows = divergence_from_logprobs(
        divergence, student_logprobs_at(student_logits, temperature), projected.log(), temperature, beta
    )
    return torch.where(no_mass, 0.0, rows)


def _sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """L1 between descending-sorted probability vectors, the shorter zero-padded. (N, A), (N, B) -> (N,)."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    student_sorted = F.pad(
        student_probs.sort(dim=-1, descending=True).values, (0, width - student_probs.shape[-1])
    )
    teacher_sorted = F.pad(
        teacher_probs.sort(dim=-1, descending=True).values, (0, width - teacher_probs.shape[-1])
    )
    return (student_sorted - teacher_sorted).abs().sum(-1)


def uld_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mapping: VocabMapping, temperature: float
) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): sorted-probability L1, no T^2. -> (N,).

    Invariant to any permutation of either vocabulary, so it needs no token correspondence at all.
    """
    _check_student(student_logits, teacher_logits, mapping)
    teacher_probs = torch.softmax(_teacher_logits(teacher_logits, mapping, temperature), dim=-1)
    return _sorted_l1(student_logprobs_at(student_logits, temperature).exp(), teacher_probs)


def _unshared(width: int, shared: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(width, dtype=torch.bool, device=shared.device)
    keep[shared] = False
    return keep


def _mass_gap(
    divergence: str,
    beta: float,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """T^2 * (mass of the second KL argument - mass of the first) over restricted vectors (N, S) -> (N,): the
    term that makes KL(a || b) = sum a log(a / b) - a + b a divergence of unnormalised measures. The skew
    divergences compare with a mixture, whose mass differs from the first argument's by (1 - alpha) times
    the gap. 0 for tvd and jsd with 0 < beta < 1 (termwise >= 0 already); jsd's ends are forward and reverse
    KL."""
    forward = {"forward_kl": 1.0, "skew_kl": 1.0 - beta, "jsd": 1.0 if beta == 0.0 else 0.0}
    reverse = {"reverse_kl": 1.0, "skew_rkl": 1.0 - beta, "jsd": 1.0 if beta == 1.0 else 0.0}
    weight = forward.get(divergence, 0.0) - reverse.get(divergence, 0.0)
    if weight == 0.0:
        return student_logprobs.new_zeros(student_logprobs.shape[:-1])
    gap = student_logprobs.exp().sum(-1) - teacher_logprobs.float().exp().sum(-1)  # Q - P
    return weight * gap * temperature**2


def hybrid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mapping: VocabMapping,
    temperature: float,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Exact divergence on shared tokens plus ULD on the rest of both vocabularies. -> (N,).

    The shared part compares the two distributions restricted to the shared ids as they are, without
    renormalising, scaled by T^2 like every KL-family divergence; the ULD part (no T^2) compares the sorted
    leftover probabilities, student columns beyond the tokenizer included. A KL between restricted vectors
    is negative wherever the student holds more shared mass than the teacher, so KL takes the form for
    unnormalised measures, e.g. forward: sum over shared of p_t * (log p_t - log q_s) - p_t + q_s, whose every
    term is >= 0 (jsd and tvd already are termwise). The sum is then >= 0 at any T and 0 when the two
    distributions agree.
    """
    if divergence in ("akl", "taid"):
        # Both renormalise or reweight per row, which has no meaning on the restricted shared vectors.
        raise UserError(
            f"the hybrid loss cannot use {divergence} on the shared tokens: use it with the projection loss, "
            "or choose forward_kl, reverse_kl, jsd, skew_kl, skew_rkl or tvd for hybrid"
        )
    _check_student(student_logits, teacher_logits, mapping)
    teacher_logprobs = torch.log_softmax(_teacher_logits(teacher_logits, mapping, temperature), dim=-1)
    student_logprobs = student_logprobs_at(student_logits, temperature)
    shared_teacher = mapping.shared_teacher_ids.to(teacher_logprobs.device)
    shared_student = mapping.shared_student_ids.to(student_logprobs.device)
    student_shared, teacher_shared = (
        student_logprobs[..., shared_student],
        teacher_logprobs[..., shared_teacher],
    )
    exact = divergence_from_logprobs(divergence, student_shared, teacher_shared, temperature, beta)
    exact = exact + _mass_gap(divergence, beta, student_shared, teacher_shared, temperature)
    rest_teacher = teacher_logprobs[..., _unshared(teacher_logprobs.shape[-1], shared_teacher)].exp()
    rest_student = student_logprobs[..., _unshared(student_logprobs.shape[-1], shared_student)].exp()
    return exact + _sorted_l1(rest_student, rest_teacher)


CROSS_VOCAB_LOSSES = {"projection": projected_divergence, "uld": uld_loss, "hybrid": hybrid_loss}
