"""Forward KL + cross-entropy with closed-form logit gradients: the default objective's fast path.

`chunked_head_loss` normally differentiates a chunk's row loss with autograd, which keeps every
intermediate (n, V) tensor of the softmaxes, the KL terms and their backward alive. For forward KL the
gradients have a closed form:

    d CE / d s            = softmax(s) - onehot(label)
    d T^2 KL(p || q) / d s = T * (mass(p) * softmax(s / T) - p)      (q = softmax(s / T), mass(p) = sum p)

so `FusedForwardKL.with_grad` computes parts and the chunk's logit gradient directly, with a few (n, V)
tensors and no autograd graph. Called plainly, it is the reference row loss it replaces (tests compare the
two).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from sakd.losses.chunked import ChunkBuffers, RowLoss
from sakd.losses.cross_vocab import VocabMapping, projected_teacher_probs
from sakd.losses.rows import IGNORE_INDEX, kd_count, kd_selection
from sakd.losses.sparse import (
    SparseTeacherSettings,
    log_mass_outside_from_probs,
    sparse_kl_buckets,
    sparse_kl_rows,
    sparse_teacher_buckets,
)
from sakd.models.head import ModelHead, as_head, head_logits


class TargetFn(Protocol):
    """The teacher's distribution over the student's first C columns, from its logits: called with (teacher
    logits (n, V_t_model) fp32, temperature, out=), it returns (probabilities (n, C), their logs (n, C)). The
    logits are a temporary of the caller, which a target may overwrite. `out_width` is the width of the (n,
    out_width) fp32 tensor it takes as `out` to write the probabilities into, so that a caller can keep one
    from chunk to chunk."""

    out_width: int

    def __call__(
        self, teacher_logits: torch.Tensor, temperature: float, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def softmax_and_log(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(x), log_softmax(x)) over the last dimension, the log written over `x` (the softmax to `out` if
    given). One exponential per entry where log_softmax then exp takes two: on a large vocabulary the
    exponentials are most of a softmax's cost."""
    x = x.sub_(x.amax(-1, keepdim=True))
    p = torch.exp(x, out=out)
    total = p.sum(-1, keepdim=True)
    return p.div_(total), x.sub_(total.log_())


class _SameVocabTarget:
    """A `TargetFn`: the teacher's distribution at T over the shared tokenizer's `vocab` ids."""

    def __init__(self, vocab: int):
        self.out_width = vocab

    def __call__(
        self, teacher_logits: torch.Tensor, temperature: float, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = teacher_logits[:, : self.out_width]
        return softmax_and_log(logits if temperature == 1.0 else logits.div_(temperature), out)


class _ProjectedTarget:
    """A `TargetFn`: the teacher's distribution at T summed onto the student's ids (`projected_teacher_probs`);
    its `out` has one more column than the student, where unmapped teacher tokens go."""

    def __init__(self, mapping: VocabMapping, student_width: int):
        self.mapping = mapping
        self.student_width = student_width
        self.out_width = student_width + 1

    def __call__(
        self, teacher_logits: torch.Tensor, temperature: float, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = projected_teacher_probs(teacher_logits, self.mapping, temperature, self.student_width, out)
        return p, p.log()


def same_vocab_target(vocab: int) -> TargetFn:
    """The teacher's distribution at T over the shared tokenizer's ids (padding columns dropped)."""
    return _SameVocabTarget(vocab)


def projected_target(mapping: VocabMapping, student_width: int) -> TargetFn:
    """The teacher's distribution at T summed onto student ids (`projected_teacher_probs`)."""
    return _ProjectedTarget(mapping, student_width)


class RowCoefficients(NamedTuple):
    """Per-row multiples of each row's cross-entropy of its next token, logged as one more part:
    `coefficients` (n,), the part's `weight` in the objective, and the rows' `next_tokens` (n,): the LM
    labels, and more where a row has a next token but no LM label (a token the student sampled itself). The
    chunk-likelihood term is such a part (`WithChunkLikelihood`)."""

    part: str
    weight: float
    coefficients: torch.Tensor
    next_tokens: torch.Tensor


def _cross_entropy(
    s: torch.Tensor,
    labels: torch.Tensor,
    weight: float,
    out: torch.Tensor | None = None,
    extra: RowCoefficients | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LM part of a chunk: {"lm": summed cross-entropy} (and `extra`'s part), log_softmax(s) (n, W) (one
    pass over the logits, written to `out` if given; the caller may overwrite it), each row's weight in the
    gradient (n,) (0 for ignored labels) and the label column (n, 1). With `extra`, each row's weight gains
    extra.weight * its coefficient: the gradient of a cross-entropy is the same softmax - onehot whatever
    multiplies it, so the extra part costs no further pass over the logits. Its next tokens are the labels
    wherever a row has a label, so one column serves both."""
    valid = labels != IGNORE_INDEX
    targets = labels if extra is None else extra.next_tokens
    column = targets.clamp_min(0)[:, None]
    logsm = torch.log_softmax(s, dim=-1, out=out)  # (n, W)
    picked = -logsm.gather(1, column).squeeze(1)  # (n,)
    ce = torch.where(valid, picked, 0.0)  # (n,)
    parts = {"lm": ce.sum()}
    if extra is None:
        return parts, logsm, torch.where(valid, weight, 0.0), column
    has_next = targets != IGNORE_INDEX
    coefficients = torch.where(has_next, extra.coefficients.float(), 0.0)
    parts[extra.part] = (coefficients * picked).sum()
    return parts, logsm, torch.where(valid, weight, 0.0) + extra.weight * coefficients, column


def _shares_softmax(s: torch.Tensor, cols: int, t: float) -> bool:
    """Whether the student's log-softmax at T over its first `cols` columns is the cross-entropy's own (T = 1
    over every column): then one softmax serves both parts."""
    return t == 1.0 and cols == s.shape[-1]


def _tempered_logprobs(s: torch.Tensor, cols: int, t: float) -> torch.Tensor:
    """log_softmax(s[:, :cols] / t) (rows, cols)."""
    student = s[:, :cols]
    return torch.log_softmax(student if t == 1.0 else student / t, dim=-1)


class _FusedRowLoss:
    """Called plainly, the reference row loss (autograd); `with_grad` is the closed-form path."""

    reference: RowLoss

    def __call__(self, logits: torch.Tensor, *row_inputs: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
        return self.reference(logits, *row_inputs, **kwargs)


class FusedForwardKL(_FusedRowLoss):
    """A distillation row loss (row inputs: labels, teacher_hidden, kd_mask, kd_weight) for forward KL.

    `reference` is the plain row loss with the same meaning (`make_distill_row_loss` of the same KD);
    `target` gives the teacher's distribution over the first C student logits (C = its width), which is where
    the student's softmax at T is taken too. `teacher_head`: the teacher's `ModelHead` (its logit transform
    applied), or a bare weight with `teacher_bias`. The student's transform is chained by `chunked_head_loss`:
    the gradient here is with respect to the student's final logits.
    """

    def __init__(
        self,
        reference: RowLoss,
        target: TargetFn,
        teacher_head: ModelHead | torch.Tensor,
        teacher_bias: torch.Tensor | None,
        temperature: float,
        jsd_beta: float | None = None,
    ):
        if jsd_beta is not None and not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"the fused JSD takes beta strictly between 0 and 1, got {jsd_beta}")
        self.reference = reference
        self.target = target
        self.teacher = as_head(teacher_head, teacher_bias)
        self.temperature = temperature
        self.jsd_beta = jsd_beta

    def _scratch(self, scratch: ChunkBuffers | None, rows: int) -> tuple:
        """Kept tensors for the teacher's (rows, V_t) logits and for the target's (rows, out_width)
        probabilities; (None, None) without `scratch`."""
        if scratch is None:
            return None, None
        weight = self.teacher.weight
        logits = scratch.get("teacher_logits", rows, weight.shape[0], weight.dtype, weight.device)
        probs = scratch.get("teacher_probs", rows, self.target.out_width, torch.float32, weight.device)
        return logits, probs

    @torch.no_grad()
    def with_grad(
        self,
        logits: torch.Tensor,
        part_weights: dict[str, float],
        *row_inputs: torch.Tensor,
        kd_rows: int | None = None,
        grad_out: torch.Tensor | None = None,
        extra: RowCoefficients | None = None,
        scratch: ChunkBuffers | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Parts (sums, as the reference returns them) and d(sum_k part_weights[k] * parts[k]) / d logits,
        written to `grad_out` (n, W) fp32 if given. `row_inputs`: labels, teacher_hidden, kd_mask, kd_weight;
        `kd_rows` as for the reference (`sakd.losses.rows.kd_selection`); `extra`: one more part, per-row
        multiples of the cross-entropy (`_cross_entropy`), with its weight in the gradient; `scratch`: kept
        tensors for the teacher's logits and probabilities (`ChunkBuffers`)."""
        labels, teacher_hidden, kd_mask, kd_weight = row_inputs
        s = logits.float()  # (n, W)
        kd_w, t = part_weights.get("kd", 0.0), self.temperature
        lm_w = part_weights.get("lm", 0.0)
        parts, logsm, lm_coef, column = _cross_entropy(s, labels, lm_w, grad_out, extra)

        # The teacher side runs on the KD rows only (all of them with one tokenizer; the aligned group ends
        # with two): its logits, softmax and projection are the expensive part.
        rows = kd_selection(kd_mask, kd_rows)
        if kd_count(rows) == 0:
            parts["kd"] = s.new_zeros(())
            grad = logsm.exp_().mul_(lm_coef[:, None])
            grad.scatter_add_(1, column, -lm_coef[:, None])
            return parts, grad
        hidden = teacher_hidden[rows].to(self.teacher.weight.dtype)
        t_logits, p_out = self._scratch(scratch, hidden.shape[0])
        p, logp = self.target(head_logits(hidden, self.teacher, t_logits), t, out=p_out)  # (k, C)
        cols = p.shape[-1]
        shared = _shares_softmax(s, cols, t)
        logq = logsm[rows] if shared else _tempered_logprobs(s[rows], cols, t)  # (k, C)
        weight = kd_weight[rows].float()
        kd_coef = kd_w * t * weight  # (k,)
        sign = 1.0
        if self.jsd_beta is not None:
            values, kd_grad = _jsd_with_grad(p, logp, logq, self.jsd_beta)
            parts["kd"] = (weight * values).sum() * t**2
            del p, logp
            grad = logsm.exp_().mul_(lm_coef[:, None])
            kd_grad.mul_(kd_coef[:, None])
        else:
            kl = _p_log_ratio(p, logp, logq).sum(-1) * t**2  # (k,); logp is overwritten
            parts["kd"] = (weight * kl).sum()
            del logp
            kd_mass = kd_coef * p.sum(-1)  # (k,) mass 1, or 0 for a projected row whose mass is all unmapped
            p.mul_(kd_coef[:, None])
            if shared:  # the KD rows' softmax is the LM's: one scaling of it serves both parts
                coef = lm_coef.clone()
                coef[rows] += kd_mass
                grad = logsm.exp_().mul_(coef[:, None])
                kd_grad, sign = p, -1.0  # the KD gradient is -p: subtracted, not negated first
            else:
                grad = logsm.exp_().mul_(lm_coef[:, None])
                kd_grad = logq.exp_().mul_(kd_mass[:, None]).sub_(p)  # (k, C)
        if isinstance(rows, slice):
            grad[rows, :cols].add_(kd_grad, alpha=sign)
        else:
            grad[:, :cols].index_add_(0, rows, kd_grad, alpha=sign)
        grad.scatter_add_(1, column, -lm_coef[:, None])
        return parts, grad


def _p_log_ratio(p: torch.Tensor, logp: torch.Tensor, logr: torch.Tensor) -> torch.Tensor:
    """p * (logp - logr) (k, C), written over `logp`, with the terms where p == 0 equal to 0 as the reference
    masks them: where p is 0, logp may be -inf (a projected column no teacher token reaches, a masked logit),
    and -inf - logr times 0 would be NaN, so logp is first raised to the lowest finite float. `logr` is the
    student's finite log-probabilities (or a mixture with them). A NaN in p or logp passes through. In place,
    because on a large vocabulary the masked product's (k, C) temporaries cost more than the divergence."""
    return logp.clamp_min_(torch.finfo(logp.dtype).min).sub_(logr).mul_(p)


def _jsd_with_grad(
    p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The generalised JSD per row, beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q,
    and its gradient with respect to the student's tempered logits u (q = softmax(u)), both without
    temperature scaling. (k, C) x3 -> (k,), (k, C).

    With g = (1 - beta) log(q / m) (the derivative with respect to q: the mixture's terms cancel), the
    softmax's Jacobian gives d JSD / d u_j = q_j (g_j - sum_i q_i g_i)."""
    q = logq.exp()
    # log m from m itself (one logarithm, where logaddexp of the logs takes an exponential and a logarithm);
    # an m below the smallest normal float is raised to it, where both p and q are 0 to fp32 anyway
    m = torch.lerp(q, p, beta)  # beta p + (1 - beta) q
    logm = m.clamp_min_(torch.finfo(m.dtype).tiny).log_()  # (k, C)
    teacher_part = _p_log_ratio(p, logp, logm).sum(-1)  # logp is overwritten
    # q * g, written over log m: the student's log-probabilities are finite, so a q that underflows to 0 gives
    # a 0 term (logq may be a view of the cross-entropy's log-softmax: not written)
    qg = logm.sub_(logq).mul_(beta - 1.0).mul_(q)  # (k, C)
    student_part = qg.sum(-1) / (1.0 - beta)  # sum q (log q - log m)
    values = beta * teacher_part + (1.0 - beta) * student_part
    grad = qg.sub_(q.mul_(qg.sum(-1, keepdim=True)))  # (k, C)
    return values, grad


class CachedRowInputs(NamedTuple):
    """The row inputs of a cached-teacher row loss, in their order (`make_cached_distill_row_loss`)."""

    labels: torch.Tensor  # (n,)
    teacher_ids: torch.Tensor  # (n, k)
    teacher_probs: torch.Tensor  # (n, k) at temperature 1
    teacher_tail: torch.Tensor  # (n,) the mass outside the top-k
    kd_mask: torch.Tensor  # (n,) bool
    kd_weight: torch.Tensor  # (n,)


class FusedCachedForwardKL(_FusedRowLoss):
    """The cached-teacher twin of `FusedForwardKL` (row inputs: labels, teacher_ids, teacher_probs,
    teacher_tail, kd_mask, kd_weight): forward KL on the k + 1 buckets of `sparse_teacher_divergence`, whose
    gradient with respect to u = student logits / T is, with q = softmax(u), P the teacher's entries, S the
    distinct student columns they land on and c = tail / (1 - q(S)),

        T * (q_j (sum P + tail - c [j not in S]) - P_j)

    `reference` is the plain row loss (`make_cached_distill_row_loss` of the same divergence)."""

    def __init__(self, reference: RowLoss, temperature: float, settings: SparseTeacherSettings):
        if settings.name != "forward_kl":
            raise ValueError(f"the fused cached loss is forward KL, not {settings.name}")
        self.reference = reference
        self.temperature = temperature
        self.settings = settings

    @torch.no_grad()
    def with_grad(
        self,
        logits: torch.Tensor,
        part_weights: dict[str, float],
        *row_inputs: torch.Tensor,
        kd_rows: int | None = None,  # not needed: rows outside kd_mask are masked, not selected
        grad_out: torch.Tensor | None = None,  # as for FusedForwardKL
        scratch: ChunkBuffers | None = None,  # not needed: the cache's entries are small
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """As `FusedForwardKL.with_grad`, with this loss's row inputs (`CachedRowInputs`, in order)."""
        r, vocab = CachedRowInputs(*row_inputs), self.settings
        s = logits.float()  # (n, W)
        kd_w, t = part_weights.get("kd", 0.0), self.temperature
        parts, logsm, lm_coef, column = _cross_entropy(s, r.labels, part_weights.get("lm", 0.0), grad_out)

        logp, log_tail, targets = sparse_teacher_buckets(
            r.teacher_ids,
            r.teacher_probs,
            r.teacher_tail,
            t,
            vocab.teacher_vocab_size,
            vocab.teacher_to_student,
        )
        own = vocab.teacher_to_student is None  # one vocabulary: the top-k ids are distinct columns
        cols = vocab.student_vocab if own else s.shape[-1]
        shared = _shares_softmax(s, cols, t)
        logq = logsm if shared else _tempered_logprobs(s, cols, t)  # (n, C)
        terms = sparse_kl_buckets(logq, targets, logp, log_tail, own_columns=own)
        q = logq.exp_()  # (n, C) the student's softmax at T
        rows, c = sparse_kl_rows(terms, log_mass_outside_from_probs(q, terms), t)
        parts["kd"] = torch.where(r.kd_mask, r.kd_weight.float() * rows, 0.0).sum()

        kd_coef = torch.where(r.kd_mask & ~terms["no_mass"], kd_w * t * r.kd_weight.float(), 0.0)  # (n,)
        entry_p = terms["entry_p"]
        # q_j (sum P + tail) on S, q_j (sum P + tail - c) outside it, then - P_j at each entry's column. S's
        # values are written, not added to the outside ones: c is huge when the student leaves almost nothing
        # outside S, and q_j (... - c) + c q_j would cancel to noise.
        # (where, not a product with 0: rows outside kd_mask never pass their cache entries on)
        kd_rows = kd_coef != 0
        mass = entry_p.sum(-1) + terms["tail_p"]
        kd_outside = torch.where(kd_rows, kd_coef * (mass - c), 0.0)  # (n,)
        kd_inside = torch.where(kd_rows & terms["has_members"], kd_coef * mass, kd_outside)
        members = terms["member_column"]
        on_entries = torch.where(kd_rows[:, None], -kd_coef[:, None] * entry_p, 0.0)
        if shared:
            kd_outside, kd_inside = lm_coef + kd_outside, lm_coef + kd_inside
        on_members = q.gather(1, members).mul_(kd_inside[:, None])
        q.mul_(kd_outside[:, None]).scatter_(1, members, on_members)
        if shared:
            grad = q
        else:
            grad = logsm.exp_().mul_(lm_coef[:, None])
            grad[:, :cols] += q
        target = grad if shared else grad[:, :cols]
        target.scatter_add_(1, terms["column"], on_entries)
        grad.scatter_add_(1, column, -lm_coef[:, None])
        return parts, grad
