"""Per-row divergences between a student and a teacher next-token distribution (same vocabulary).

All functions are pure, compute in fp32 and return one value per row, shape (N,). The teacher side is given as
log-probabilities already at the distillation temperature; they may hold -inf for impossible tokens, and
0 * log 0 is taken as 0 by masking with torch.where, never by nan_to_num or clamping, so a real fault (a
student that gives zero probability to a token the teacher expects) still shows as inf.

The cores work on log-probabilities so that the cross-vocabulary losses share one implementation; the
Hinton T^2 scaling is applied in exactly one place, `divergence_from_logprobs`.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sakd.errors import UserError

AKL_TOP_K = 64
"""How many of the teacher's top tokens AKL sorts before falling back to a full sort of the row."""

HINTON_SCALED = frozenset({"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "akl", "taid"})


def _weighted_log_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v p_v * (log p_v - log q_v) over the last dim, with terms where p_v == 0 taken as 0.

    (N, V), (N, V) -> (N,). p need not be normalised (the hybrid loss uses restricted vectors).
    """
    p = logp.exp()
    # Masking the difference (not the product) keeps the backward pass free of 0 * inf; `p == 0` (not
    # `p > 0`) lets a NaN through, so that a fault upstream is caught rather than zeroed.
    log_ratio = torch.where(p == 0, 0.0, logp - logq)
    return (p * log_ratio).sum(-1)


def forward_kl_logprobs(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p_T || q_S), no temperature scaling. (N, V), (N, V) -> (N,)."""
    return _weighted_log_ratio(teacher_logprobs, student_logprobs)


def reverse_kl_logprobs(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(q_S || p_T), no temperature scaling; inf where the teacher rules out a token the student allows.

    (N, V), (N, V) -> (N,).
    """
    return _weighted_log_ratio(student_logprobs, teacher_logprobs)


def jsd_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Generalised JSD of TRL's GKD, no temperature scaling. (N, V), (N, V) -> (N,).

    beta * KL(p_T || m) + (1 - beta) * KL(q_S || m) with m = beta * p_T + (1 - beta) * q_S. As in TRL, beta = 0
    is forward KL and beta = 1 reverse KL: these ends are conventions (the mixture itself tends to 0 there),
    so they dispatch exactly rather than being evaluated.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl_logprobs(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return reverse_kl_logprobs(student_logprobs, teacher_logprobs)
    log_mixture = _log_mixture(teacher_logprobs, student_logprobs, beta)
    return beta * _weighted_log_ratio(teacher_logprobs, log_mixture) + (1.0 - beta) * _weighted_log_ratio(
        student_logprobs, log_mixture
    )


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight: float) -> torch.Tensor:
    """log(weight * p + (1 - weight) * q) for 0 < weight < 1, with finite inputs where both are -inf (the
    mixture is never used there, but logaddexp's backward would be NaN)."""
    impossible = torch.isneginf(logp) & torch.isneginf(logq)
    return torch.logaddexp(
        logp.masked_fill(impossible, 0.0) + math.log(weight),
        logq.masked_fill(impossible, 0.0) + math.log1p(-weight),
    )


def skew_kl_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p_T || alpha p_T + (1 - alpha) q_S), no temperature scaling. (N, V) -> (N,).

    The student side is mixed with a little of the teacher, so the divergence stays finite (bounded by
    log(1/alpha)) where the student gives a token almost no probability; alpha = 0 is forward KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return forward_kl_logprobs(student_logprobs, teacher_logprobs)
    return _weighted_log_ratio(teacher_logprobs, _log_mixture(teacher_logprobs, student_logprobs, alpha))


def skew_reverse_kl_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float = 0.1
) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(q_S || alpha q_S + (1 - alpha) p_T), no temperature scaling.
    (N, V) -> (N,). Finite even where the teacher rules a token out (a projected teacher does), unlike
    reverse KL; alpha = 0 is reverse KL."""
    # skew KL with the two sides' roles swapped
    return skew_kl_logprobs(teacher_logprobs, student_logprobs, alpha)


def akl_logprobs(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mu: float = 0.5
) -> torch.Tensor:
    """Adaptive KL (Wu et al. 2024, "Rethinking Kullback-Leibler divergence in knowledge distillation for large
    language models"), no temperature scaling. (N, V), (N, V) -> (N,).

    The teacher's tokens are sorted by probability; the head is the top token plus every token while the
    cumulative teacher mass stays <= mu, the tail the rest. With the gaps g_head = sum over the head of
    |p_T - q_S| and g_tail likewise, the row is g_head / (g_head + g_tail) * KL(p_T || q_S) +
    g_tail / (g_head + g_tail) * KL(q_S || p_T): forward KL fits the head, reverse KL the tail, each in
    proportion to how far the student is off there. The weights are detached, as in the authors' code.
    """
    if not 0.0 <= mu < 1.0:
        raise ValueError(f"akl mu must be in [0, 1), got {mu}")
    head_weight = _akl_head_weight(student_logprobs.detach(), teacher_logprobs.detach(), mu)
    forward = forward_kl_logprobs(student_logprobs, teacher_logprobs)
    reverse = reverse_kl_logprobs(student_logprobs, teacher_logprobs)
    return head_weight * forward + (1.0 - head_weight) * reverse


def _akl_head_weight(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mu: float
) -> torch.Tensor:
    """g_head / (g_head + g_tail) of `akl_logprobs`. (N, V), (N, V) -> (N,).

    The head usually ends within the teacher's top few tokens, so only the top AKL_TOP_K are sorted; rows
    whose top-k hold no more than mu (a flat teacher, the head may go on) sort their whole vocabulary.
    """
    teacher_probs = teacher_logprobs.exp()
    gap = (teacher_probs - student_logprobs.exp()).abs()  # (N, V)
    top_probs, top = teacher_probs.topk(min(AKL_TOP_K, gap.shape[-1]), dim=-1)  # (N, k), descending
    head_gap = _head_gap(top_probs, gap.gather(-1, top), mu)
    unresolved = (top_probs.sum(-1) <= mu) & (top.shape[-1] < gap.shape[-1])  # (N,)
    if unresolved.any():
        sorted_probs, order = teacher_probs[unresolved].sort(dim=-1, descending=True)
        head_gap[unresolved] = _head_gap(sorted_probs, gap[unresolved].gather(-1, order), mu)
    total = gap.sum(-1)
    # Equal distributions have no gap: both KLs are 0 there, so any weight does; `total == 0` (not
    # `total > 0`) keeps a NaN visible.
    return torch.where(total == 0, 0.5, head_gap / total)


def _head_gap(sorted_probs: torch.Tensor, sorted_gap: torch.Tensor, mu: float) -> torch.Tensor:
    """Sum of the gap over the head, given the teacher's probabilities in descending order (a prefix of them
    suffices when the head ends inside it). (N, k), (N, k) -> (N,)."""
    tail = sorted_probs.cumsum(-1) > mu
    tail[..., 0] = False  # the top token is head even when it alone holds more than mu
    return torch.where(tail, 0.0, sorted_gap).sum(-1)


def taid_logprobs(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, t: float) -> torch.Tensor:
    """TAID's loss (Shing et al. 2025, "TAID: temporally adaptive interpolated distillation"): KL(p_t || q_S)
    with the intermediate target p_t = softmax((1 - t) * stopgrad(log q_S) + t * log p_T), no temperature
    scaling. (N, V), (N, V) -> (N,).

    The interpolation is in logit space; log-probabilities differ from logits by a per-row constant, which the
    softmax removes. t = 0 targets the student itself (loss 0), t = 1 is forward KL. `TAIDSchedule` moves t
    from t_start to t_end during training.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"taid t must be in [0, 1], got {t}")
    mixed = _scaled(student_logprobs.detach(), 1.0 - t) + _scaled(teacher_logprobs, t)  # (N, V)
    # A teacher row that rules out every token (a projected teacher certain of an unmapped token) leaves no
    # target; the student then targets itself (0, zero gradient) instead of a NaN softmax.
    no_target = torch.isneginf(mixed).all(-1, keepdim=True)
    target = F.log_softmax(torch.where(no_target, student_logprobs.detach(), mixed), dim=-1)
    return _weighted_log_ratio(target, student_logprobs)


def _scaled(logprobs: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * logprobs, with weight 0 giving 0 also where logprobs is -inf (not NaN)."""
    return torch.zeros_like(logprobs) if weight == 0.0 else weight * logprobs


def tvd_logprobs(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Total variation 0.5 * sum |p_T - q_S|. (N, V), (N, V) -> (N,)."""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


_CORES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "forward_kl": lambda s, t, beta: forward_kl_logprobs(s, t),
    "reverse_kl": lambda s, t, beta: reverse_kl_logprobs(s, t),
    "jsd": jsd_logprobs,
    "tvd": lambda s, t, beta: tvd_logprobs(s, t),
    "skew_kl": skew_kl_logprobs,  # beta: the skew alpha
    "skew_rkl": skew_reverse_kl_logprobs,
    "akl": akl_logprobs,  # beta: the head mass mu
    "taid": taid_logprobs,  # beta: the interpolation t
}


def _check_name(name: str) -> None:
    if name not in _CORES:
        raise ValueError(f"unknown divergence {name!r}: choose one of {sorted(_CORES)}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def divergence_from_logprobs(
    name: str,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
) -> torch.Tensor:
    """The named divergence on log-probabilities at `temperature`, scaled by T^2 for the KL family.

    (N, V), (N, V) -> (N,) fp32. The T^2 factor (Hinton et al. 2015) keeps the gradient magnitude of a
    softened KL independent of the temperature; TVD is a bounded distance and stays unscaled.
    """
    _check_name(name)
    _check_temperature(temperature)
    rows = _CORES[name](student_logprobs.float(), teacher_logprobs.float(), beta)
    return rows * temperature**2 if name in HINTON_SCALED else rows


def student_logprobs_at(student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(student_logits / T) in fp32. (N, V) -> (N, V)."""
    _check_temperature(temperature)
    return F.log_softmax(student_logits.float() / temperature, dim=-1)


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
) -> torch.Tensor:
    """The named divergence ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "akl", "taid")
    between same-vocabulary models; `beta` is jsd's mixture weight, the skew divergences' alpha, akl's head
    mass mu and taid's interpolation t (the current value of a `TAIDSchedule`).

    student_logits (N, V) any float dtype; teacher_logprobs (N, V) = log_softmax(teacher_logits / T).
    Returns (N,) fp32.
    """
    _check_name(name)
    if student_logits.shape != teacher_logprobs.shape:
        raise UserError(
            f"student logits {tuple(student_logits.shape)} and teacher log-probabilities "
            f"{tuple(teacher_logprobs.shape)} differ in shape: if the vocabularies differ, use a cross-vocabulary "
            "loss (projection, uld or hybrid); if both models share one tokenizer but pad their vocabularies "
            "differently, slice both logits to len(tokenizer) first"
        )
    student_logprobs = student_logprobs_at(student_logits, temperature)
    return divergence_from_logprobs(name, student_logprobs, teacher_logprobs, temperature, beta)


def forward_kl(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(p_T || q_S). (N, V), (N, V) -> (N,)."""
    return divergence("forward_kl", student_logits, teacher_logprobs, temperature)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(q_S || p_T). (N, V), (N, V) -> (N,)."""
    return divergence("reverse_kl", student_logits, teacher_logprobs, temperature)


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float, beta: float = 0.5
) -> torch.Tensor:
    """T^2 * generalised JSD with mixture weight beta (see `jsd_logprobs`). (N, V), (N, V) -> (N,)."""
    return divergence("jsd", student_logits, teacher_logprobs, temperature, beta)


def total_variation(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """0.5 * sum |p_T - q_S|, no T^2. (N, V), (N, V) -> (N,)."""
    return divergence("tvd", student_logits, teacher_logprobs, temperature)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "tvd": total_variation,
}
