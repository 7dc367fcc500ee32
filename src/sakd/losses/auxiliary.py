"""Auxiliary transfer losses on aligned groups: hidden states, attention maps, layer pairs, contrastive.

Teacher and student see the same characters through different tokenizers, so their sequences differ in length
and token i of one is not token i of the other; everything here compares ALIGNED GROUPS, the spans both
tokenizations cut at the same characters, with a group's state the mean over its tokens (`group_mean`). Losses
are pure functions: fp32 inside, masked by valid rows, teacher tensors detached, a SUM over valid rows divided
by `count` (pass the global count of valid rows of the optimizer step so that micro-batching does not change
the loss; the default is the local count), and exactly 0, never NaN, when nothing is valid.

Scale: so that no auxiliary loss swamps the others on models with large activations, hidden-state losses
compare LayerNorm'd vectors (zero mean, unit variance per row, no affine), for which the per-dimension mean
squared error is 2 * (1 - Pearson correlation), in [0, 4] whatever the hidden sizes or activation magnitudes,
so no division by a magic constant is ever needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Attention probabilities of tokens far in the past underflow to exactly 0 in fp16/fp32; this floor keeps such
# a row's KL finite (at most ~18 nats per unit of teacher mass) without touching NaN, which still propagates.
ATTENTION_PROB_FLOOR = 1e-8


def _normalised(count: float | torch.Tensor | None, total: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """total / count (default: the number of valid rows), 0 when there is nothing to divide."""
    if count is None:
        count = valid.sum()
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
    return total / count.clamp_min(1.0)


def group_mean(
    hidden: torch.Tensor, group: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the token states in each aligned group, fp32. hidden (B, L, *F), group (B, L) with -1 at
    padding -> (means (B, G, *F), counts (B, G) tokens per group). Empty groups are 0; padded positions never
    reach the sums, even when they hold NaN."""
    b, length = group.shape
    feat_shape = hidden.shape[2:]
    flat = hidden.reshape(b * length, -1).float()  # (B*L, F)
    keep = (group >= 0).reshape(-1)  # (B*L,)
    if (group >= num_groups).any():
        raise ValueError(f"group indices reach {int(group.max())} but num_groups is {num_groups}")
    # Padding goes to one extra bucket that is cut off; `where` (not a multiply) keeps NaN garbage out.
    index = torch.where(
        group >= 0, group + torch.arange(b, device=group.device)[:, None] * num_groups, b * num_groups
    )
    index = index.reshape(-1)  # (B*L,)
    flat = torch.where(keep[:, None], flat, 0.0)
    sums = flat.new_zeros(b * num_groups + 1, flat.shape[1]).index_add_(0, index, flat)[:-1]  # (B*G, F)
    counts = flat.new_zeros(b * num_groups + 1).index_add_(0, index, keep.float())[:-1]  # (B*G,)
    means = sums / counts.clamp_min(1.0)[:, None]
    return means.reshape(b, num_groups, *feat_shape), counts.reshape(b, num_groups)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters, fp32."""
    return F.layer_norm(x.float(), x.shape[-1:])


def feature_loss(
    student_groups: torch.Tensor,
    teacher_groups: torch.Tensor,
    projection: nn.Module,
    valid: torch.Tensor | None = None,
    count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Hidden-state transfer: mean squared error between LN(projection(student)) and LN(teacher), per dim.

    student_groups (N, Hs), teacher_groups (N, Ht) (detached here), projection: Hs -> Ht (learned, e.g.
    nn.Linear), valid (N,) bool (default all). Each row's term is 2 * (1 - corr) in [0, 4]. Returns the sum
    over valid rows / count, fp32 scalar.
    """
    if valid is None:
        valid = torch.ones(student_groups.shape[0], dtype=torch.bool, device=student_groups.device)
    # Invalid rows are zeroed before use, so that garbage there cannot reach a gradient as NaN * 0.
    student_groups = torch.where(valid[:, None], student_groups, 0.0)
    teacher_groups = torch.where(valid[:, None], teacher_groups.detach(), 0.0)
    predicted = standardise(projection(student_groups))  # (N, Ht)
    target = standardise(teacher_groups)  # (N, Ht)
    if predicted.shape != target.shape:
        raise ValueError(
            f"the projection maps student groups to {tuple(predicted.shape)} but the teacher groups are "
            f"{tuple(target.shape)}: build it as nn.Linear(student_hidden, teacher_hidden)"
        )
    rows = (predicted - target).pow(2).mean(-1)  # (N,)
    return _normalised(count, torch.where(valid, rows, 0.0).sum(), valid)


def _pooled_attention(
    attn: torch.Tensor, group: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-averaged attention pooled onto groups: row i is the mean over group i's query tokens of the
    attention mass each key group receives, so a row is still a distribution. (B, h, L, L) -> (B, G, G), and
    the per-group token counts (B, G)."""
    real = group >= 0  # (B, L)
    mean_heads = attn.float().mean(1)  # (B, L, L)
    mean_heads = torch.where(real[:, :, None] & real[:, None, :], mean_heads, 0.0)
    key_onehot = F.one_hot(group.clamp_min(0), num_groups).float() * real[..., None]  # (B, L, G)
    per_key_group = mean_heads @ key_onehot  # (B, L, G)
    return group_mean(per_key_group, group, num_groups)


def attention_transfer_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    student_group: torch.Tensor,
    teacher_group: torch.Tensor,
    num_groups: int,
    valid: torch.Tensor | None = None,
    kind: Literal["kl", "mse"] = "kl",
    count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention-map transfer on aligned groups (sequences of different lengths and head counts).

    student_attn (B, heads_s, Ls, Ls), teacher_attn (B, heads_t, Lt, Lt) (detached here): attention
    probabilities of one layer each (eager attention). student_group (B, Ls), teacher_group (B, Lt): group
    index per token, -1 at padding. Both maps are head-averaged and pooled to (B, G, G) group-to-group
    distributions; row i is compared by KL(teacher || student) ("kl") or squared error summed over key groups
    ("mse"). valid (B, G) bool chooses the query groups (default: groups with tokens on both sides).
    Returns the sum over valid rows / count.
    """
    student_rows, student_counts = _pooled_attention(student_attn, student_group, num_groups)  # (B, G, G)
    teacher_rows, teacher_counts = _pooled_attention(teacher_attn.detach(), teacher_group, num_groups)
    present = (student_counts > 0) & (teacher_counts > 0)  # (B, G)
    valid = present if valid is None else valid & present
    if kind == "kl":
        # Masking the difference (not the product) keeps 0 * -inf out of both passes.
        log_ratio = torch.where(
            teacher_rows == 0, 0.0, teacher_rows.log() - (student_rows + ATTENTION_PROB_FLOOR).log()
        )
        rows = (teacher_rows * log_ratio).sum(-1)  # (B, G)
    elif kind == "mse":
        rows = (teacher_rows - student_rows).pow(2).sum(-1)  # (B, G)
    else:
        raise ValueError(f"unknown attention loss kind {kind!r}: choose 'kl' or 'mse'")
    return _normalised(count, torch.where(valid, rows, 0.0).sum(), valid)


def default_layer_map(
    num_student_layers: int, num_teacher_layers: int, num_pairs: int
) -> list[tuple[int, int]]:
    """num_pairs (student, teacher) indices into the models' `hidden_states` tuples (0 = embeddings, i = the
    output of layer i; in transformers 5.x the last entry has the final norm applied), spread evenly over
    both depths and ending at the last layers: (30, 24, 3) -> [(10, 8), (20, 16), (30, 24)]."""
    if not 1 <= num_pairs <= min(num_student_layers, num_teacher_layers):
        raise ValueError(
            f"num_pairs must be in 1..{min(num_student_layers, num_teacher_layers)}, got {num_pairs}"
        )
    return [
        (round((i + 1) * num_student_layers / num_pairs), round((i + 1) * num_teacher_layers / num_pairs))
        for i in range(num_pairs)
    ]


def layer_projections(
    layer_map: Sequence[tuple[int, int]], student_hidden: int, teacher_hidden: int
) -> nn.ModuleList:
    """One learned Hs -> Ht projection per layer pair, for `layerwise_loss`."""
    return nn.ModuleList(nn.Linear(student_hidden, teacher_hidden) for _ in layer_map)


def layerwise_loss(
    student_hidden_list: Sequence[torch.Tensor],
    teacher_hidden_list: Sequence[torch.Tensor],
    layer_map: Sequence[tuple[int, int]],
    projections: Sequence[nn.Module],
    student_group: torch.Tensor,
    teacher_group: torch.Tensor,
    align_mask: torch.Tensor,
    count: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over layer pairs of `feature_loss` between group means of the paired layers.

    student_hidden_list: (B, Ls, Hs) per student layer; teacher_hidden_list: (B, Lt, Ht) per teacher layer
    (e.g. the models' `hidden_states` tuples); layer_map: (student index, teacher index) pairs;
    projections[i] maps pair i's student states to the teacher width; student_group (B, Ls), teacher_group
    (B, Lt); align_mask (B, G) the valid groups. The mean (not the sum) over pairs keeps the loss in [0, 4]
    for any number of pairs.
    """
    if len(projections) != len(layer_map) or not layer_map:
        raise ValueError(f"{len(layer_map)} layer pairs need as many projections, got {len(projections)}")
    bad = [
        pair
        for pair in layer_map
        if not (0 <= pair[0] < len(student_hidden_list) and 0 <= pair[1] < len(teacher_hidden_list))
    ]
    if bad:
        raise ValueError(
            f"layer pairs {bad} are outside the {len(student_hidden_list)} student and "
            f"{len(teacher_hidden_list)} teacher hidden states given"
        )
    num_groups = align_mask.shape[1]
    total = None
    for (s_index, t_index), projection in zip(layer_map, projections, strict=True):
        student_groups, _ = group_mean(student_hidden_list[s_index], student_group, num_groups)  # (B, G, Hs)
        teacher_groups, _ = group_mean(teacher_hidden_list[t_index].detach(), teacher_group, num_groups)
        term = feature_loss(
            student_groups.reshape(-1, student_groups.shape[-1]),
            teacher_groups.reshape(-1, teacher_groups.shape[-1]),
            projection,
            align_mask.reshape(-1),
            count,
        )
        total = term if total is None else total + term
    return total / len(layer_map)


def pooled_groups(group_states: torch.Tensor, align_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over each window's valid groups: group_states (B, G, H), align_mask (B, G) -> (pooled (B, H),
    valid (B,) windows with at least one valid group)."""
    weights = align_mask.float()  # (B, G)
    states = torch.where(align_mask[..., None], group_states.float(), 0.0)
    pooled = (weights[..., None] * states).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)  # (B, H)
    return pooled, align_mask.any(1)


def contrastive_loss(
    student_pooled: torch.Tensor,
    teacher_pooled: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
    symmetric: bool = True,
) -> torch.Tensor:
    """InfoNCE over the batch: each window's student representation must pick its own teacher one.

    student_pooled (B, D), teacher_pooled (B, D) (detached here; project the student to D first),
    temperature: fixed (a learnable one could shrink towards 0 and blow the loss up), valid (B,) bool windows
    (invalid ones are neither anchors nor negatives). Cosine similarities / temperature; cross-entropy with the
    diagonal as targets, averaged over valid anchors (and over both directions when `symmetric`). A batch-level
    loss: it is a mean over this micro-batch's windows, 0 with fewer than one valid window.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if valid is None:
        valid = torch.ones(student_pooled.shape[0], dtype=torch.bool, device=student_pooled.device)
    student = F.normalize(torch.where(valid[:, None], student_pooled.float(), 1.0), dim=-1)  # (B, D)
    teacher = F.normalize(torch.where(valid[:, None], teacher_pooled.detach().float(), 1.0), dim=-1)
    logits = student @ teacher.T / temperature  # (B, B)
    pair_valid = valid[:, None] & valid[None, :]
    logits = logits.masked_fill(~pair_valid, float("-inf"))
    targets = torch.arange(logits.shape[0], device=logits.device)
    directions = [logits, logits.T] if symmetric else [logits]
    total = logits.new_zeros(())
    for direction in directions:
        # Invalid anchors have an all -inf row: give them finite logits, then drop them.
        safe = torch.where(valid[:, None], direction, 0.0)
        rows = F.cross_entropy(safe, targets, reduction="none")  # (B,)
        total = total + torch.where(valid, rows, 0.0).sum()
    return _normalised(None, total / len(directions), valid)
