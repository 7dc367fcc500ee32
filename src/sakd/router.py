"""The student-aware router: which teacher knowledge each aligned group should learn, and how much.

Per aligned group t (a row here), with the student's group state s_t, the teacher's E knowledge sources
(experts of one MoE layer, or evenly spaced layers, see `sakd.models.experts`) and the knowledge gap g_t
(the detached per-row divergence between teacher and student predictions):

- sources are detached and LayerNorm'd without affine, so every source has the same scale;
- scores_tj = query(LN(s_t)) . key(source_tj) / sqrt(d); routing weights are a softmax of scores / T over
  the top-k sources (zero elsewhere), with k and T given by the curriculum (never learned);
- routed knowledge m_t = sum_j w_tj source_tj stays in the teacher's (normalised) source space: the target
  side has no learned parameters, so the feature loss cannot be met by collapsing both sides onto a constant
  vector, as it could if m were projected by a learned map too;
- feature rows = mean over dims of (LN(proj(s_t)) - LN(m_t))^2 = 2 * (1 - corr), in [0, 4] whatever the
  widths (576 vs 1024) or activation scales: O(1) by construction, not by an arbitrary division, so it
  cannot swamp the KD loss on a model with large activations; the rows are weighted by the token weights
  below, so features are taught where KD is;
- balance loss (Switch Transformer): E * sum_j f_j p_j, f_j the fraction of rows whose top-1 source is j,
  p_j the mean full-softmax probability of j; 1 at uniform routing, E at total collapse;
- capacity c_t = sigmoid(MLP(LN(s_t))) in (0, 1), a probe on the DETACHED student state trained (binary
  cross-entropy) to predict the agreement exp(-g_t / mean g) from the student's state alone: how much of the
  teacher the student absorbs at a state like this one;
- KD token weights w_t proportional to (1 + g_t / mean g) ** c, c the mean capacity over the valid rows: more
  weight where the student is far from the teacher, always in the order of the gap. The capacity only tempers
  how steeply: a student that absorbs little of the teacher is pushed less hard toward its largest gaps. A
  per-row capacity factor would invert the order, since a trained probe predicts exp(-g / mean g) and so
  falls where the gap grows. Detached, and scaled to mean exactly 1 over the valid rows while bounded to
  [min_weight, max_weight] (`bounded_unit_mean`); the configured strength blends them with uniform weights
  (`blend_token_weights`).

Teacher and student sequences differ in length; both are pooled onto the aligned groups first
(`aligned_group_states`), so the router only ever sees rows that correspond, never token i of one side
against token i of the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sakd.losses.auxiliary import group_mean, standardise
from sakd.models.head import ModelHead, as_head, head_logits


@dataclass
class RouterOutput:
    """What one router call returns; N rows, E sources. Losses are fp32 scalars with gradients.

    feature_loss: routed-knowledge transfer (token-weighted sum of rows in [0, 4] / count).
    balance_loss: Switch load balance, 1 at uniform routing.
    capacity_loss: BCE of the capacity probe against the observed agreement (trains only the probe).
    token_weights (N,): detached KD weights, mean 1 over valid rows, within the bounds; 0 at invalid rows.
    capacity (N,): detached capacity in (0, 1).
    expert_probs (N, E): full softmax of scores / T (with gradient), what the balance loss sees.
    routing_weights (N, E): top-k softmax (with gradient), zero outside the top k.
    expert_load (E,): detached fraction of valid rows whose top-1 source is each expert.
    """

    feature_loss: torch.Tensor
    balance_loss: torch.Tensor
    capacity_loss: torch.Tensor
    token_weights: torch.Tensor
    capacity: torch.Tensor
    expert_probs: torch.Tensor
    routing_weights: torch.Tensor
    expert_load: torch.Tensor


def switch_balance_loss(expert_probs: torch.Tensor, top1: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """E * sum_j f_j * p_j over valid rows (Fedus et al. 2021). expert_probs (N, E), top1 (N,) long, valid
    (N,) bool -> fp32 scalar; 0 when no row is valid. Gradients flow through p only (f is a count)."""
    num_experts = expert_probs.shape[-1]
    weights = valid.float()  # (N,)
    rows = weights.sum().clamp_min(1.0)
    load = (F.one_hot(top1, num_experts).float() * weights[:, None]).sum(0) / rows  # (E,)
    probs = torch.where(valid[:, None], expert_probs.float(), 0.0)
    mean_probs = (probs * weights[:, None]).sum(0) / rows  # (E,)
    return num_experts * (load * mean_probs).sum()


def bounded_unit_mean(
    raw: torch.Tensor, valid: torch.Tensor, min_weight: float, max_weight: float, iterations: int = 60
) -> torch.Tensor:
    """Positive weights scaled to mean exactly 1 over the valid rows and bounded to [min_weight, max_weight].

    raw (N,) >= 0, valid (N,) bool -> (N,) fp32, detached, 0 at invalid rows. Finds the scale a with
    mean(clamp(a * raw, min, max)) = 1 by bisection (a monotone function of a), so that, unlike clamping
    and then renormalising, the result is both within the bounds and of mean 1. Rows whose raw weights are
    all equal get weight 1. Vectorised without host synchronisation.
    """
    if not 0.0 <= min_weight <= 1.0 <= max_weight:
        raise ValueError(
            f"token weight bounds must satisfy 0 <= min <= 1 <= max, got [{min_weight}, {max_weight}]"
        )
    if raw.numel() == 0:
        return raw.detach().float()
    x = torch.where(valid, raw.detach().double(), 0.0)  # (N,)
    count = valid.sum().clamp_min(1)
    # Relative to the largest weight, with a floor so that the search interval is finite.
    x = torch.where(valid, (x / x.max().clamp_min(1e-300)).clamp_min(1e-6), 0.0)
    low = torch.zeros((), dtype=torch.float64, device=x.device)
    high = max_weight / torch.where(valid, x, 1.0).min()  # every valid row at max_weight: mean >= 1

    def mean_at(scale: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, (scale * x).clamp(min_weight, max_weight), 0.0).sum() / count

    for _ in range(iterations):
        mid = (low + high) / 2
        below = mean_at(mid) < 1.0
        low = torch.where(below, mid, low)
        high = torch.where(below, high, mid)
    scale = (low + high) / 2
    return torch.where(valid, (scale * x).clamp(min_weight, max_weight), 0.0).float()


def gap_weights(
    relative_gap: torch.Tensor, capacity: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """Raw KD token weights (1 + relative_gap) ** mean capacity, monotone non-decreasing in the gap.

    relative_gap (N,) >= 0 (g / mean g), capacity (N,) in (0, 1), valid (N,) bool, rows: the number of valid
    rows -> (N,) >= 1. One exponent for all rows keeps the order of the gap whatever the capacities.
    """
    steepness = torch.where(valid, capacity, 0.0).sum() / rows  # () in [0, 1)
    return (1.0 + relative_gap).pow(steepness)


def blend_token_weights(token_weights: torch.Tensor, strength: float) -> torch.Tensor:
    """1 + strength * (w - 1): plain KD at strength 0, the router's weights at 1; the mean stays 1 and the
    bounds hold for any strength in [0, 1] (the curriculum's token_weighting weight: the configured strength
    times its ramp)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return 1.0 + strength * (token_weights - 1.0)


def aligned_group_states(
    student_hidden: torch.Tensor,
    student_group: torch.Tensor,
    sources: torch.Tensor,
    teacher_group: torch.Tensor,
    align_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router rows from a batch: the valid aligned groups, in align_mask order (row-major over (B, G)).

    student_hidden (B, Ls, Hs) (keeps its graph), student_group (B, Ls), sources (B, Lt, E, Ht) (detached),
    teacher_group (B, Lt), align_mask (B, G) -> (student states (N, Hs), sources (N, E, Ht)), both fp32 group
    means, N = align_mask.sum(). Ls and Lt may differ: only group indices connect the two sides.
    """
    num_groups = align_mask.shape[1]
    student_groups, _ = group_mean(student_hidden, student_group, num_groups)  # (B, G, Hs)
    source_groups, _ = group_mean(sources.detach(), teacher_group, num_groups)  # (B, G, E, Ht)
    return student_groups[align_mask], source_groups[align_mask]


@torch.no_grad()
def knowledge_gap(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: ModelHead | torch.Tensor,
    teacher_head: ModelHead | torch.Tensor,
    kd_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int = 1024,
    student_head_bias: torch.Tensor | None = None,
    teacher_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Detached per-row divergence between teacher and student next-token predictions, chunked.

    student_hidden (N, Hs), teacher_hidden (N, Ht) final hidden states at the aligned rows; the heads
    (`ModelHead`s, or bare weights (V_s, Hs), (V_t, Ht) with the biases given apart); kd_fn the objective's
    per-row KD function ((n, V_s) fp32, (n, V_t) fp32) -> (n,).
    Returns (N,) fp32. Only chunk_size rows of logits exist at a time.
    """
    s_head, t_head = as_head(student_head, student_head_bias), as_head(teacher_head, teacher_head_bias)
    return chunked_gap(student_hidden, s_head, [teacher_hidden], kd_fn, chunk_size, t_head)


@torch.no_grad()
def chunked_gap(
    student_hidden: torch.Tensor,
    student_head: ModelHead,
    teacher_rows: list[torch.Tensor],
    kd_fn: Callable[..., torch.Tensor],
    chunk_size: int,
    teacher_head: ModelHead | None = None,
) -> torch.Tensor:
    """kd_fn(student logits (n, V_s), *teacher chunks) -> (n,) over chunks of `chunk_size` rows, detached:
    (N,) fp32. Each of `teacher_rows` (N, ...) is cut into the same chunks; with `teacher_head` they are the
    teacher's final hidden states, and kd_fn gets their logits (n, V_t). Only one chunk of logits exists at a
    time."""
    gaps = []
    for start in range(0, student_hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        s_logits = head_logits(student_hidden[rows].to(student_head.weight.dtype), student_head)  # (n, V_s)
        teacher = [t[rows] for t in teacher_rows]
        if teacher_head is not None:
            teacher = [head_logits(t.to(teacher_head.weight.dtype), teacher_head) for t in teacher]
        gaps.append(kd_fn(s_logits, *teacher).float())
    return torch.cat(gaps) if gaps else student_hidden.new_zeros(0, dtype=torch.float32)


class StudentAwareRouter(nn.Module):
    """Routes each aligned group to its top-k teacher knowledge sources; see the module docstring.

    student_hidden: the student's width Hs; source_hidden: the sources' width Ht; num_sources: E;
    dim: the query/key width d; capacity_hidden: the capacity MLP's width; min_weight / max_weight: bounds
    of the KD token weights (0 <= min <= 1 <= max). All parameters are its own (give them their own LR and
    checkpoint its state_dict); it holds no temperature or scale: those come from the curriculum.
    """

    def __init__(
        self,
        student_hidden: int,
        source_hidden: int,
        num_sources: int,
        dim: int = 128,
        capacity_hidden: int = 64,
        min_weight: float = 0.25,
        max_weight: float = 4.0,
    ):
        super().__init__()
        if num_sources < 1:
            raise ValueError(f"the router needs at least one knowledge source, got {num_sources}")
        if not 0.0 <= min_weight <= 1.0 <= max_weight:
            raise ValueError(
                f"token weight bounds must satisfy 0 <= min <= 1 <= max, got [{min_weight}, {max_weight}]"
            )
        self.num_sources = num_sources
        self.source_hidden = source_hidden
        self.dim = dim
        self.min_weight = min_weight
        self.max_weight = max_weight
        self.query = nn.Linear(student_hidden, dim)
        self.key = nn.Linear(source_hidden, dim)
        self.projection = nn.Linear(student_hidden, source_hidden)
        self.capacity_head = nn.Sequential(
            nn.Linear(student_hidden, capacity_hidden), nn.GELU(), nn.Linear(capacity_hidden, 1)
        )

    def _student_awareness(
        self, student: torch.Tensor, gap: torch.Tensor, valid: torch.Tensor, rows, divisor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Capacity (N,), the capacity probe's loss, and the KD token weights (N,), from standardised student
        states and the masked gap."""
        mean_gap = gap.sum() / rows
        relative_gap = torch.where(mean_gap > 0, gap / mean_gap.clamp_min(1e-12), 0.0)  # (N,), mean 1
        capacity_logits = self.capacity_head(student.detach()).squeeze(-1).float()  # (N,)
        capacity = capacity_logits.sigmoid()
        agreement = torch.exp(-relative_gap)  # (N,) in (0, 1]
        capacity_rows = F.binary_cross_entropy_with_logits(capacity_logits, agreement, reduction="none")
        capacity_loss = torch.where(valid, capacity_rows, 0.0).sum() / divisor
        token_weights = bounded_unit_mean(
            gap_weights(relative_gap, capacity.detach(), valid, rows), valid, self.min_weight, self.max_weight
        )  # (N,)
        return capacity, capacity_loss, token_weights

    def token_weights(
        self,
        student_states: torch.Tensor,
        gap: torch.Tensor,
        valid: torch.Tensor | None = None,
        count: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the student-aware KD token weights (N,) and the capacity probe's loss: what `forward` gives
        for them, without touching the knowledge sources (when no routed feature loss is wanted)."""
        n = student_states.shape[0]
        if valid is None:
            valid = torch.ones(n, dtype=torch.bool, device=student_states.device)
        rows = valid.sum().clamp_min(1).float()
        divisor = rows if count is None else torch.as_tensor(count, dtype=torch.float32, device=rows.device)
        student = standardise(torch.where(valid[:, None], student_states, 0.0))
        gap = torch.where(valid, gap.detach().float(), 0.0)
        _, capacity_loss, weights = self._student_awareness(student, gap, valid, rows, divisor.clamp_min(1.0))
        return weights, capacity_loss

    def forward(
        self,
        student_states: torch.Tensor,
        sources: torch.Tensor,
        gap: torch.Tensor,
        top_k: int,
        temperature: float,
        valid: torch.Tensor | None = None,
        count: float | torch.Tensor | None = None,
    ) -> RouterOutput:
        """student_states (N, Hs) group means (with graph), sources (N, E, Ht) (detached here), gap (N,) >= 0
        (detached here), top_k in 1..E (larger values mean all E), temperature > 0, valid (N,) bool (default
        all), count: the divisor of the summed feature and capacity rows (default: valid rows here; pass the
        global count of aligned rows of the optimizer step for accumulation-invariant losses)."""
        n, num_sources, width = sources.shape
        if num_sources != self.num_sources or width != self.source_hidden:
            raise ValueError(
                f"the router was built for {self.num_sources} sources of width {self.source_hidden}, "
                f"got sources {tuple(sources.shape)}"
            )
        if student_states.shape[0] != n or gap.shape != (n,):
            raise ValueError(
                f"rows disagree: student states {tuple(student_states.shape)}, sources "
                f"{tuple(sources.shape)}, gap {tuple(gap.shape)}: pool both sides onto the aligned groups "
                "first (aligned_group_states)"
            )
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if valid is None:
            valid = torch.ones(n, dtype=torch.bool, device=sources.device)
        top_k = min(top_k, num_sources)
        rows = valid.sum().clamp_min(1).float()
        divisor = (
            rows if count is None else torch.as_tensor(count, dtype=torch.float32, device=sources.device)
        )
        divisor = divisor.clamp_min(1.0)

        # Invalid rows are zeroed first so that garbage there cannot reach a gradient as NaN * 0.
        student = standardise(torch.where(valid[:, None], student_states, 0.0))  # (N, Hs)
        sources = standardise(torch.where(valid[:, None, None], sources.detach(), 0.0))  # (N, E, Ht)
        gap = torch.where(valid, gap.detach().float(), 0.0)  # (N,)

        query = self.query(student).float()  # (N, d)
        keys = self.key(sources).float()  # (N, E, d)
        scores = torch.einsum("nd,ned->ne", query, keys) / math.sqrt(self.dim) / temperature  # (N, E)
        expert_probs = scores.softmax(-1)  # (N, E)
        top_index = scores.topk(top_k, dim=-1).indices  # (N, k)
        in_top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_index, True)
        routing_weights = scores.masked_fill(~in_top, float("-inf")).softmax(-1)  # (N, E), 0 outside top-k
        routed = torch.einsum("ne,neh->nh", routing_weights, sources)  # (N, Ht)

        capacity, capacity_loss, token_weights = self._student_awareness(student, gap, valid, rows, divisor)

        predicted = standardise(self.projection(student))  # (N, Ht)
        feature_rows = (predicted - standardise(routed)).pow(2).mean(-1)  # (N,) in [0, 4]
        feature_loss = torch.where(valid, token_weights * feature_rows, 0.0).sum() / divisor

        top1 = top_index[:, 0]
        balance_loss = switch_balance_loss(expert_probs, top1, valid)
        expert_load = (F.one_hot(top1, num_sources).float() * valid[:, None]).sum(0).detach() / rows
        return RouterOutput(
            feature_loss=feature_loss,
            balance_loss=balance_loss,
            capacity_loss=capacity_loss,
            token_weights=token_weights,
            capacity=torch.where(valid, capacity.detach(), 0.0),
            expert_probs=expert_probs,
            routing_weights=routing_weights,
            expert_load=expert_load,
        )
