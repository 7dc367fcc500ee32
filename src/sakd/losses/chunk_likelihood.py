"""Chunk-likelihood matching across tokenizers: approximate likelihood matching, ALM (Minixhofer et al. 2025,
"Universal cross-tokenizer distillation via approximate likelihood matching"; the loss follows the tokenkit
library's binarised f-divergence on chunk probabilities with a temperature).

An alignment group covers the same text on both sides, after the same text. The probability each model gives
that text in its own tokenization is the product of the probabilities of the group's tokens, so its log is
the sum of the label log-probabilities of the positions that predict them: a quantity both models define,
whatever their vocabularies. Matching it gives every student position inside a group a signal, not only the
group's last one.

Each chunk log-probability l <= 0 is binarised at a temperature tau: y = exp(l / tau - eps) is the probability
of a Bernoulli variable ("the model produces this chunk here", softened), and the loss per group is the KL
between the teacher's and the student's Bernoulli. tau = 100 (tokenkit's default) keeps y away from 0 for
long chunks, so the gradient does not vanish; eps keeps log(1 - y) finite for a chunk whose probability
rounds to 1. tokenkit's "binary_ce" is this forward binary KL plus the teacher's binary entropy, a constant:
the gradients are the same, and here equal chunk probabilities give 0.

Label log-probability of a position = -(its next-token cross-entropy), which the LM loss already computes.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sakd.losses.fused import RowCoefficients
from sakd.losses.rows import IGNORE_INDEX
from sakd.models.head import ModelHead, head_logits

__all__ = [
    "BINARY_DIVERGENCES",
    "ChunkLikelihood",
    "WithChunkLikelihood",
    "chunk_likelihood_loss",
    "chunk_logprobs",
    "label_groups",
    "label_logprobs",
]

BINARY_DIVERGENCES = ("binary_kl", "reverse_binary_kl")


def label_groups(
    group: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, num_groups: int | None = None
) -> torch.Tensor:
    """The alignment group of the token each position predicts, -1 where that group is not fully predicted.

    group (N, L): each token's group as `collate_windows` gives it (each `Side`'s `group`; -1 for
    prefix and padding); labels (N, L): the next token, ignore_index where there is none. Returns (N, L)
    int64. Position i predicts token i + 1, so it belongs to group[i + 1]. A group keeps its positions only
    if every one of its tokens is predicted: the window's first token never is (so the first group's text is
    incomplete whenever it holds more than one token), nor are tokens masked out of the loss. Comparing an
    incomplete chunk with the other side's complete one would compare different texts. `num_groups`: at
    least the largest group id + 1 (the batch's `alignment.mask.shape[1]`); given, it spares a device sync.
    """
    if group.shape != labels.shape:
        raise ValueError(f"group {tuple(group.shape)} and labels {tuple(labels.shape)} must have one shape")
    predicted = torch.full_like(group, -1)
    predicted[:, :-1] = group[:, 1:]
    predicted = torch.where(labels == ignore_index, -1, predicted)  # (N, L)
    num_groups = _num_groups(group) if num_groups is None else num_groups
    tokens = _count(group, num_groups)  # (N, G)
    complete = (tokens > 0) & (_count(predicted, num_groups) == tokens)  # (N, G)
    complete = torch.cat([complete, complete.new_zeros(group.shape[0], 1)], dim=1)  # (N, G + 1): -1 -> False
    keep = complete.gather(1, torch.where(predicted < 0, num_groups, predicted))  # (N, L)
    return torch.where(keep, predicted, -1)


def _num_groups(*groups: torch.Tensor) -> int:
    """The largest group id + 1 over all tensors (0 when there is none)."""
    return 1 + max((int(g.max().item()) for g in groups if g.numel()), default=-1)


def _count(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Positions per group id. (N, L) -> (N, num_groups), ids < 0 not counted."""
    counts = group.new_zeros(group.shape[0], num_groups + 1)
    counts.scatter_add_(1, torch.where(group < 0, num_groups, group), torch.ones_like(group))
    return counts[:, :num_groups]


def chunk_logprobs(
    label_logprobs: torch.Tensor, label_group: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of label log-probabilities per group, and which groups have positions.

    label_logprobs (N, L) float, label_group (N, L) int64 (-1: none, as `label_groups` gives). Returns
    (N, num_groups) fp32 sums (0 for absent groups) and (N, num_groups) bool presence. Positions without a
    group add nothing, whatever their value (an ignored label may hold -inf or garbage).
    """
    if label_logprobs.shape != label_group.shape:
        raise ValueError(
            f"label log-probabilities {tuple(label_logprobs.shape)} and groups {tuple(label_group.shape)} "
            "must have one shape"
        )
    index = torch.where(label_group < 0, num_groups, label_group)  # (N, L); -1 goes to a dropped column
    values = torch.where(label_group < 0, 0.0, label_logprobs.float())
    sums = values.new_zeros(label_group.shape[0], num_groups + 1).scatter_add(1, index, values)
    present = _count(label_group, num_groups) > 0
    return sums[:, :num_groups], present


def chunk_likelihood_loss(
    student_label_logprobs: torch.Tensor,
    student_label_group: torch.Tensor,
    teacher_label_logprobs: torch.Tensor,
    teacher_label_group: torch.Tensor,
    temperature: float = 100.0,
    divergence: str = "binary_kl",
    epsilon: float = 1e-6,
    num_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALM loss per alignment group present on both sides.

    student_label_logprobs (N, Ls) and teacher_label_logprobs (N, Lt): each position's log-probability of its
    label; student_label_group (N, Ls), teacher_label_group (N, Lt): `label_groups` of each side. The
    teacher is detached; the student keeps its graph, and every student position of a matched group gets a
    gradient. `divergence`: "binary_kl" (KL(teacher || student) of the binarised chunk probabilities) or
    "reverse_binary_kl". Returns the loss (N, G) fp32, 0 outside matched groups, and the matched mask (N, G)
    bool, G = `num_groups` if given (as for `label_groups`), else the largest group id + 1. A mean over
    groups is loss.sum() / mask.sum().
    """
    if divergence not in BINARY_DIVERGENCES:
        raise ValueError(f"unknown chunk divergence {divergence!r}: choose one of {list(BINARY_DIVERGENCES)}")
    if not temperature > 0 or not epsilon >= 0:
        raise ValueError(f"temperature must be positive and epsilon >= 0, got {temperature} and {epsilon}")
    if student_label_group.shape[0] != teacher_label_group.shape[0]:
        raise ValueError("student and teacher must hold the same number of rows")
    if num_groups is None:
        num_groups = _num_groups(student_label_group, teacher_label_group)
    student, student_present = chunk_logprobs(student_label_logprobs, student_label_group, num_groups)
    teacher, teacher_present = chunk_logprobs(
        teacher_label_logprobs.detach(), teacher_label_group, num_groups
    )
    matched = student_present & teacher_present  # (N, G)
    # Unmatched entries get a harmless stand-in so that neither the value nor the gradient can turn NaN.
    log_y_student = _binarised(torch.where(matched, student, -1.0), temperature, epsilon)
    log_y_teacher = _binarised(torch.where(matched, teacher, -1.0), temperature, epsilon)
    if divergence == "binary_kl":
        loss = _binary_kl(log_y_teacher, log_y_student)
    else:
        loss = _binary_kl(log_y_student, log_y_teacher)
    return torch.where(matched, loss, 0.0), matched


def _binarised(chunk_logprob: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
    # A sum of log-probabilities is <= 0; the clamp removes rounding above 0.
    return chunk_logprob.clamp(max=0.0) / temperature - epsilon


def _binary_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(a) || Bernoulli(b)) from log a, log b <= 0, elementwise, with 0 * log 0 taken as 0."""
    a, not_a = log_a.exp(), -torch.expm1(log_a)
    present = a * torch.where(a == 0, 0.0, log_a - log_b)
    absent = not_a * torch.where(not_a == 0, 0.0, _log1mexp(log_a) - _log1mexp(log_b))
    return present + absent


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012). Each branch sees only inputs on its
    own side of -log 2, so the branch not taken cannot put an inf into the backward pass."""
    cut = -math.log(2.0)
    near_zero = torch.log(-torch.expm1(x.clamp(min=cut)))
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    return torch.where(x > cut, near_zero, far)


@torch.no_grad()
def label_logprobs(
    hidden: torch.Tensor, head: ModelHead, labels: torch.Tensor, rows_per_chunk: int
) -> torch.Tensor:
    """Each row's log-probability of its label, fp32 (N,) (0 where the label is ignore_index), from hidden
    (N, H) through the LM `head` a chunk of rows at a time, so no (N x vocabulary) logits exist in full."""
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], max(rows_per_chunk, 1)):
        stop = start + rows_per_chunk
        logits = head_logits(hidden[start:stop].to(head.weight.dtype), head)  # (n, V) fp32
        chunk_labels = labels[start:stop]
        picked = logits.gather(1, chunk_labels.clamp_min(0)[:, None]).squeeze(1) - logits.logsumexp(-1)
        out[start:stop] = torch.where(chunk_labels == IGNORE_INDEX, 0.0, picked)
    return out


@dataclass(frozen=True)
class ChunkLikelihood:
    """The chunk-likelihood term of the distillation loss: `weight` times `temperature` times the binarised
    divergence per matched group. Scaled by the temperature, the loss of a chunk whose probability is not
    near 1 is about (l_s - l_t)^2 / (2 |l_s|) at any large temperature, so `weight` means the same whatever the
    temperature."""

    weight: float
    temperature: float = 100.0
    divergence: str = "binary_kl"

    def position_weights(
        self,
        student: tuple[torch.Tensor, torch.Tensor],
        teacher: tuple[torch.Tensor, torch.Tensor],
        num_groups: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The term's derivative with respect to each student position's cross-entropy, and its value.

        student, teacher: (label log-probabilities (N, L), `label_groups` (N, L)) of each side. Returns the
        coefficients (N, Ls) fp32 (the term's gradient is the sum over positions of coefficient times the
        gradient of that position's cross-entropy, since a chunk's log-probability is minus the sum of its
        positions' cross-entropies), the term's sum over matched groups (scalar) and their number (scalar)."""
        leaf = student[0].detach().float().requires_grad_(True)
        with torch.enable_grad():
            loss, matched = chunk_likelihood_loss(
                leaf, student[1], *teacher, self.temperature, self.divergence, num_groups=num_groups
            )
            total = self.temperature * loss.sum()
            (grad,) = torch.autograd.grad(total, leaf)
        return -grad, total.detach(), matched.sum()


class WithChunkLikelihood:
    """A row loss plus the part "alm": the sum over rows of a coefficient times the row's cross-entropy of its
    next token. The last two row inputs are the coefficients (`ChunkLikelihood.position_weights` at the rows)
    and the next tokens; the inner row loss reads the others, its LM labels first, as every row loss of
    `sakd.losses.rows` and `sakd.losses.fused` does. The next tokens are the LM labels, and more where the
    student sampled a token itself (which has no LM label but is part of the text the term compares).
    Its gradient is the chunk-likelihood term's; its value is not the term's (the caller logs that). A row
    loss whose closed-form `with_grad` takes per-row cross-entropy multiples (`extra`, as `FusedForwardKL`'s)
    keeps that path: the part then adds its coefficients to the cross-entropy's per-row weights, inside the
    loss's one log-softmax of the chunk. Any other row loss runs through autograd."""

    def __init__(self, inner):
        self.inner = inner
        closed_form = getattr(inner, "with_grad", None)
        if closed_form is not None and "extra" in inspect.signature(closed_form).parameters:
            self.with_grad = self._with_grad

    def __call__(self, logits: torch.Tensor, *row_inputs: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        *inputs, coefficients, next_tokens = row_inputs
        parts = self.inner(logits, *inputs, **kwargs)
        ce = F.cross_entropy(logits.float(), next_tokens, ignore_index=IGNORE_INDEX, reduction="none")  # (n,)
        parts["alm"] = (coefficients.float() * ce).sum()
        return parts

    def _with_grad(
        self, logits: torch.Tensor, part_weights: dict[str, float], *row_inputs: torch.Tensor, **kwargs
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        *inputs, coefficients, next_tokens = row_inputs
        extra = RowCoefficients("alm", part_weights.get("alm", 0.0), coefficients, next_tokens)
        others = {name: w for name, w in part_weights.items() if name != "alm"}
        return self.inner.with_grad(logits, others, *inputs, extra=extra, **kwargs)
