"""Auxiliary losses on aligned groups: matching inputs give 0, padding garbage changes nothing, empty is 0."""

import pytest
import torch
from torch import nn

from sakd.losses.auxiliary import (
    attention_transfer_loss,
    contrastive_loss,
    default_layer_map,
    feature_loss,
    group_mean,
    layer_projections,
    layerwise_loss,
    pooled_groups,
)

# Two windows: student 7 tokens, teacher 9 tokens, the same 4 groups (the second window has 3 and padding).
STUDENT_GROUP = torch.tensor([[0, 0, 1, 2, 2, 2, 3], [0, 1, 1, 2, -1, -1, -1]])
TEACHER_GROUP = torch.tensor([[0, 1, 1, 1, 2, 3, 3, 3, 3], [0, 0, 0, 1, 2, 2, -1, -1, -1]])
ALIGN_MASK = torch.tensor([[True, True, True, False], [True, True, False, False]])


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _with_garbage(x: torch.Tensor, group: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    pad = (group < 0).reshape(*group.shape, *([1] * (x.dim() - 2)))
    return torch.where(pad, value, x)


def test_group_mean():
    hidden = torch.arange(7.0).reshape(1, 7, 1).repeat(2, 1, 3)  # (B, L, H)
    means, counts = group_mean(_with_garbage(hidden, STUDENT_GROUP), STUDENT_GROUP, 4)
    assert means.shape == (2, 4, 3)
    torch.testing.assert_close(means[0, :, 0], torch.tensor([0.5, 2.0, 4.0, 6.0]))
    torch.testing.assert_close(means[1, :, 0], torch.tensor([0.0, 1.5, 3.0, 0.0]))
    torch.testing.assert_close(counts, torch.tensor([[2.0, 1.0, 3.0, 1.0], [1.0, 2.0, 1.0, 0.0]]))
    # Extra feature dims are pooled too, and the graph is kept.
    x = torch.randn(2, 7, 4, 5, requires_grad=True)
    pooled, _ = group_mean(x, STUDENT_GROUP, 4)
    assert pooled.shape == (2, 4, 4, 5)
    pooled.sum().backward()
    assert (x.grad[1, 4:] == 0).all() and (x.grad[0] != 0).all()
    with pytest.raises(ValueError, match="num_groups"):
        group_mean(hidden, STUDENT_GROUP, 3)


def test_feature_loss_zero_for_matching_inputs_and_scale_free():
    x = torch.randn(6, 8)
    assert feature_loss(x, x, _Identity()).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(x, 5 * x + 3, _Identity()).item() == pytest.approx(0.0, abs=1e-5)
    y = torch.randn(6, 8)
    loss = feature_loss(x, y, _Identity())
    assert 0.0 < loss.item() <= 4.0
    torch.testing.assert_close(feature_loss(1e3 * x, 1e3 * y, _Identity()), loss, rtol=1e-4, atol=1e-5)


def test_feature_loss_masking_count_and_empty():
    projection = nn.Linear(5, 8)
    s, t = torch.randn(4, 5), torch.randn(4, 8)
    valid = torch.tensor([True, True, True, False])
    garbage_s = s.clone()
    garbage_s[3] = float("nan")
    garbage_t = t.clone()
    garbage_t[3] = 1e30
    plain = feature_loss(s[:3], t[:3], projection)
    masked = feature_loss(garbage_s.requires_grad_(), garbage_t, projection, valid)
    torch.testing.assert_close(masked, plain)
    masked.backward()
    assert torch.isfinite(projection.weight.grad).all() and torch.isfinite(garbage_s.grad).all()
    torch.testing.assert_close(feature_loss(s[:3], t[:3], projection, count=6), plain / 2)
    nothing = feature_loss(garbage_s, garbage_t, projection, torch.zeros(4, dtype=torch.bool))
    assert nothing.item() == 0.0
    with pytest.raises(ValueError, match="nn.Linear"):
        feature_loss(s, t, nn.Linear(5, 7))


def _causal_attention(batch: int, heads: int, length: int, group: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, length, length, generator=g)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keys = (group >= 0)[:, None, None, :]
    return scores.masked_fill(~(causal & keys), float("-inf")).softmax(-1)


def _token_attention_from_groups(rows: torch.Tensor, group: torch.Tensor, heads: int) -> torch.Tensor:
    """Token attention that pools back to the (B, G, G) rows: spread each key group's mass over its tokens."""
    b, length = group.shape
    onehot = torch.nn.functional.one_hot(group.clamp_min(0), rows.shape[-1]).float() * (group >= 0)[..., None]
    sizes = onehot.sum(1).clamp_min(1)  # (B, G)
    per_token = torch.einsum("bgh,blh->bgl", rows / sizes[:, None, :], onehot)  # (B, G, L)
    attn = torch.einsum("blg,bgk->blk", onehot, per_token)  # (B, L, L)
    return attn[:, None].expand(b, heads, length, length)


def test_attention_transfer_zero_for_matching_group_maps():
    """Maps that agree at the group level give 0 though lengths (7 vs 9) and head counts (2 vs 3) differ."""
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(2, 4, 4, generator=g).tril() + 0.1 * torch.eye(4)
    rows = rows / rows.sum(-1, keepdim=True)  # (B, G, G) group-to-group distributions
    student = _token_attention_from_groups(rows, STUDENT_GROUP, heads=2)
    teacher = _token_attention_from_groups(rows, TEACHER_GROUP, heads=3)
    for kind in ("kl", "mse"):
        loss = attention_transfer_loss(student, teacher, STUDENT_GROUP, TEACHER_GROUP, 4, kind=kind)
        assert loss.item() == pytest.approx(0.0, abs=1e-6)
    other = _causal_attention(2, 2, 7, STUDENT_GROUP, seed=3)
    assert attention_transfer_loss(other, teacher, STUDENT_GROUP, TEACHER_GROUP, 4).item() > 1e-3


def test_attention_transfer_masking_and_gradients():
    student_scores = torch.randn(2, 2, 7, 7, requires_grad=True)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    student = student_scores.masked_fill(~causal, float("-inf")).softmax(-1)
    teacher = _causal_attention(2, 3, 9, TEACHER_GROUP, seed=1)
    base = attention_transfer_loss(student, teacher, STUDENT_GROUP, TEACHER_GROUP, 4, ALIGN_MASK)
    # Garbage at padded queries and keys (NaN) changes nothing.
    s_pad = (STUDENT_GROUP < 0)[:, None]
    t_pad = (TEACHER_GROUP < 0)[:, None]
    garbage_student = torch.where(s_pad[..., None] | s_pad[..., None, :], float("nan"), student)
    garbage_teacher = torch.where(t_pad[..., None] | t_pad[..., None, :], float("nan"), teacher)
    masked = attention_transfer_loss(
        garbage_student, garbage_teacher, STUDENT_GROUP, TEACHER_GROUP, 4, ALIGN_MASK
    )
    assert torch.isfinite(base) and base.item() > 0
    torch.testing.assert_close(masked, base)
    masked.backward()
    assert torch.isfinite(student_scores.grad).all() and student_scores.grad.abs().sum() > 0
    nothing = attention_transfer_loss(
        garbage_student, garbage_teacher, STUDENT_GROUP, TEACHER_GROUP, 4, torch.zeros_like(ALIGN_MASK)
    )
    assert nothing.item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        attention_transfer_loss(student, teacher, STUDENT_GROUP, TEACHER_GROUP, 4, kind="l1")


def test_attention_kl_finite_when_student_mass_underflows():
    teacher = _causal_attention(2, 1, 9, TEACHER_GROUP, seed=2)
    student = torch.zeros(2, 1, 7, 7)
    student[..., torch.arange(7), torch.arange(7)] = 1.0  # all mass on itself: 0 on earlier groups
    loss = attention_transfer_loss(student, teacher, STUDENT_GROUP, TEACHER_GROUP, 4, ALIGN_MASK)
    assert torch.isfinite(loss) and loss.item() > 1.0


def test_default_layer_map():
    assert default_layer_map(30, 24, 3) == [(10, 8), (20, 16), (30, 24)]
    assert default_layer_map(2, 4, 2) == [(1, 2), (2, 4)]
    with pytest.raises(ValueError):
        default_layer_map(2, 4, 3)


def test_layerwise_loss():
    layer_map = [(1, 2), (2, 3)]
    student_hidden = [torch.randn(2, 7, 5, requires_grad=True) for _ in range(3)]
    teacher_hidden = [torch.randn(2, 9, 8) for _ in range(4)]
    projections = layer_projections(layer_map, 5, 8)
    loss = layerwise_loss(
        student_hidden, teacher_hidden, layer_map, projections, STUDENT_GROUP, TEACHER_GROUP, ALIGN_MASK
    )
    assert 0.0 < loss.item() <= 4.0
    loss.backward()
    assert student_hidden[0].grad is None and torch.isfinite(student_hidden[1].grad).all()
    assert all(p.grad is not None for p in projections.parameters())

    # The same states on both sides (identity projections, equal widths) give 0.
    same = [torch.randn(2, 7, 8) for _ in range(4)]
    zero = layerwise_loss(
        same, same, [(1, 1), (3, 3)], [_Identity(), _Identity()], STUDENT_GROUP, STUDENT_GROUP, ALIGN_MASK
    )
    assert zero.item() == pytest.approx(0.0, abs=1e-6)

    # Garbage at padding changes nothing; nothing valid gives 0.
    garbage_student = [_with_garbage(h.detach(), STUDENT_GROUP) for h in student_hidden]
    garbage_teacher = [_with_garbage(h, TEACHER_GROUP) for h in teacher_hidden]
    args = (layer_map, projections, STUDENT_GROUP, TEACHER_GROUP)
    torch.testing.assert_close(layerwise_loss(garbage_student, garbage_teacher, *args, ALIGN_MASK), loss)
    empty = layerwise_loss(garbage_student, garbage_teacher, *args, torch.zeros_like(ALIGN_MASK))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="outside"):
        layerwise_loss(student_hidden, teacher_hidden, [(3, 0)], projections[:1], *args[2:], ALIGN_MASK)
    with pytest.raises(ValueError, match="projections"):
        layerwise_loss(student_hidden, teacher_hidden, layer_map, projections[:1], *args[2:], ALIGN_MASK)


def test_pooled_groups():
    states = torch.arange(8.0).reshape(2, 4, 1)
    states[1, 2:] = float("nan")
    pooled, valid = pooled_groups(states, ALIGN_MASK)
    torch.testing.assert_close(pooled[:, 0], torch.tensor([1.0, 4.5]))
    pooled, valid = pooled_groups(states, torch.tensor([[True, False, False, False], [False] * 4]))
    assert valid.tolist() == [True, False] and pooled[1, 0] == 0


def test_contrastive_minimal_when_matching():
    basis = torch.eye(6)[:4]  # 4 orthonormal windows
    assert contrastive_loss(basis, basis, temperature=0.05).item() == pytest.approx(0.0, abs=1e-6)
    matched = contrastive_loss(basis, basis, temperature=0.5)
    shuffled = contrastive_loss(basis, basis[[1, 2, 3, 0]], temperature=0.5)
    assert shuffled.item() > matched.item()


def test_contrastive_masking_gradients_and_empty():
    student = torch.randn(5, 8, requires_grad=True)
    teacher = torch.randn(5, 8)
    valid = torch.tensor([True, True, True, False, True])
    garbage_student = torch.where(valid[:, None], student, float("nan"))
    garbage_teacher = torch.where(valid[:, None], teacher, 1e30)
    keep = valid.nonzero().squeeze(-1)
    for symmetric in (True, False):
        plain = contrastive_loss(student[keep], teacher[keep], 0.1, symmetric=symmetric)
        masked = contrastive_loss(garbage_student, garbage_teacher, 0.1, valid, symmetric=symmetric)
        torch.testing.assert_close(masked, plain)
    masked.backward()
    assert torch.isfinite(student.grad).all() and student.grad[3].abs().sum() == 0
    assert student.grad[0].abs().sum() > 0
    assert (
        contrastive_loss(garbage_student, garbage_teacher, 0.1, torch.zeros(5, dtype=torch.bool)).item()
        == 0.0
    )
    one = torch.tensor([True, False, False, False, False])
    assert contrastive_loss(garbage_student, garbage_teacher, 0.1, one).item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(student, teacher, 0.0)
