import functools
import weakref

import pytest
import torch

from sakd.losses.chunked import chunked_head_loss, full_head_loss
from sakd.losses.divergence import forward_kl
from sakd.losses.rows import lm_row_loss, make_distill_row_loss
from sakd.models.head import ModelHead

ROWS, HIDDEN, VOCAB, TEACHER_HIDDEN, TEACHER_VOCAB = 37, 16, 50, 12, 70


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    # Same-vocabulary KD at T = 2 on the first VOCAB teacher columns (a stand-in for any per-row kd function).
    return forward_kl(student_logits, torch.log_softmax(teacher_logits[:, :VOCAB] / 2.0, -1), 2.0)


def _batch(seed: int = 0, rows: int = ROWS):
    g = _gen(seed)
    labels = torch.randint(0, VOCAB, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < 0.3] = -100
    teacher_hidden = torch.randn(rows, TEACHER_HIDDEN, generator=g)
    kd_mask = torch.rand(rows, generator=g) < 0.7
    kd_weight = torch.rand(rows, generator=g) + 0.5
    return labels, teacher_hidden, kd_mask, kd_weight


def _params(seed: int = 1, bias: bool = False, rows: int = ROWS):
    g = _gen(seed)
    hidden = torch.randn(rows, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).requires_grad_()
    head_bias = torch.randn(VOCAB, generator=g).requires_grad_() if bias else None
    return hidden, weight, head_bias


def _row_loss():
    teacher_weight = torch.randn(TEACHER_VOCAB, TEACHER_HIDDEN, generator=_gen(2))
    return make_distill_row_loss(
        _kd, teacher_weight, teacher_bias=torch.randn(TEACHER_VOCAB, generator=_gen(3))
    )


WEIGHTS = {"lm": 0.7, "kd": 1.3}


def _grads(total, tensors):
    return torch.autograd.grad(total, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 5, 16, ROWS, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_full(chunk_size: int, bias: bool) -> None:
    hidden, weight, head_bias = _params(bias=bias)
    row_loss, inputs = _row_loss(), _batch()
    head = ModelHead(weight, head_bias)
    total, parts = chunked_head_loss(hidden, head, row_loss, inputs, WEIGHTS, chunk_size)
    ref_total, ref_parts = full_head_loss(hidden, head, row_loss, inputs, WEIGHTS)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    assert parts.keys() == ref_parts.keys() == {"lm", "kd"}
    for name in parts:
        torch.testing.assert_close(parts[name], ref_parts[name], rtol=1e-5, atol=1e-5)
        assert not parts[name].requires_grad
    for ours, ref in zip(
        _grads(total, [hidden, weight, head_bias]),
        _grads(ref_total, [hidden, weight, head_bias]),
        strict=True,
    ):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_tied_weights() -> None:
    # The head weight is also the input embedding: both uses must receive gradient.
    embedding = (torch.randn(VOCAB, HIDDEN, generator=_gen(4)) * 0.5).requires_grad_()
    mix = torch.randn(HIDDEN, HIDDEN, generator=_gen(5)).requires_grad_()
    tokens = torch.randint(0, VOCAB, (ROWS,), generator=_gen(6))
    row_loss, inputs = _row_loss(), _batch()

    def run(loss_fn):
        hidden = torch.tanh(embedding[tokens] @ mix)
        total, _ = loss_fn(hidden, embedding, row_loss, inputs, WEIGHTS)
        return total, torch.autograd.grad(total, [embedding, mix])

    total, grads = run(functools.partial(chunked_head_loss, chunk_size=8))
    ref_total, ref_grads = run(full_head_loss)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_backward_scales_with_upstream_gradient_and_accumulates() -> None:
    hidden, weight, _ = _params()
    row_loss, inputs = _row_loss(), _batch()
    total, _ = chunked_head_loss(hidden, weight, row_loss, inputs, WEIGHTS, chunk_size=7)
    (3.0 * total).backward()
    ref_total, _ = full_head_loss(hidden, weight, row_loss, inputs, WEIGHTS)
    ref = torch.autograd.grad(3.0 * ref_total, [hidden, weight])
    torch.testing.assert_close(hidden.grad, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, ref[1], rtol=1e-5, atol=1e-5)


def test_grads_in_parameter_dtype() -> None:
    hidden = torch.randn(ROWS, HIDDEN, generator=_gen(7)).bfloat16().requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=_gen(8)).bfloat16().requires_grad_()
    labels = _batch()[0]
    total, parts = chunked_head_loss(hidden, weight, lm_row_loss, [labels], {"lm": 1.0}, chunk_size=8)
    assert total.dtype == parts["lm"].dtype == torch.float32
    grad_hidden, grad_weight = torch.autograd.grad(total, [hidden, weight])
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    ref_total, _ = full_head_loss(hidden, weight, lm_row_loss, [labels], {"lm": 1.0})
    ref_hidden, ref_weight = torch.autograd.grad(ref_total, [hidden, weight])
    torch.testing.assert_close(total, ref_total, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad_weight, ref_weight, rtol=2e-2, atol=2e-2)


def test_all_masked_batch_is_zero_not_nan() -> None:
    hidden, weight, _ = _params()
    labels, teacher_hidden, _, kd_weight = _batch()
    inputs = [torch.full_like(labels, -100), teacher_hidden, torch.zeros(ROWS, dtype=torch.bool), kd_weight]
    for loss_fn in (functools.partial(chunked_head_loss, chunk_size=8), full_head_loss):
        total, parts = loss_fn(hidden, weight, _row_loss(), inputs, WEIGHTS)
        assert total.item() == 0.0 and parts["lm"].item() == 0.0 and parts["kd"].item() == 0.0
        for grad in torch.autograd.grad(total, [hidden, weight], allow_unused=True, materialize_grads=True):
            assert torch.equal(grad, torch.zeros_like(grad))


def test_empty_batch() -> None:
    hidden, weight, _ = _params(rows=0)
    total, parts = chunked_head_loss(hidden, weight, _row_loss(), _batch(rows=0), WEIGHTS, chunk_size=4)
    assert total.item() == 0.0 and parts == {"lm": 0.0, "kd": 0.0}
    grad_hidden, grad_weight = torch.autograd.grad(total, [hidden, weight])
    assert grad_hidden.shape == (0, HIDDEN) and torch.equal(grad_weight, torch.zeros_like(weight))


def test_evaluation_skips_gradients() -> None:
    hidden, weight, _ = _params()
    row_loss, inputs = _row_loss(), _batch()
    with torch.no_grad():
        total, parts = chunked_head_loss(hidden, weight, row_loss, inputs, WEIGHTS, chunk_size=8)
    assert not total.requires_grad
    ref_total, _ = full_head_loss(hidden.detach(), weight.detach(), row_loss, inputs, WEIGHTS)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)


def test_zero_weight_part_only_logged() -> None:
    hidden, weight, _ = _params()
    labels = _batch()[0]

    def row_loss(logits, labels):
        return {"lm": lm_row_loss(logits, labels)["lm"], "bad": (logits.abs().sum() + 1) * torch.inf}

    total, parts = chunked_head_loss(hidden, weight, row_loss, [labels], {"lm": 1.0}, chunk_size=8)
    assert torch.isinf(parts["bad"]) and torch.isfinite(total)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(total, [hidden, weight]))
    with pytest.raises(ValueError, match="kd"):
        chunked_head_loss(hidden, weight, lm_row_loss, [labels], {"lm": 1.0, "kd": 0.5})


def test_memory_is_flat_in_rows() -> None:
    rows, vocab, hidden_size, chunk = 4096, 32000, 64, 256
    hidden = torch.randn(rows, hidden_size, generator=_gen(9)).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=_gen(10)) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=_gen(11))
    seen_rows = []

    def row_loss(logits, labels):
        seen_rows.append(logits.shape[0])
        return lm_row_loss(logits, labels)

    class Saved:
        """What the autograd graph keeps for backward; dropped when the graph part holding it is freed."""

        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

    saved: weakref.WeakSet = weakref.WeakSet()

    def pack(tensor: torch.Tensor) -> Saved:
        saved.add(holder := Saved(tensor))
        return holder

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
        total, _ = chunked_head_loss(hidden, weight, row_loss, [labels], {"lm": 1.0}, chunk_size=chunk)
    kept_for_backward = sum(h.tensor.numel() * h.tensor.element_size() for h in saved)
    assert 0 < kept_for_backward < rows * vocab * 4 / 4
    total.backward()
    assert max(seen_rows) == chunk and sum(seen_rows) == rows
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_distill_row_loss_parts_are_sums() -> None:
    logits = torch.randn(ROWS, VOCAB, generator=_gen(12))
    labels, teacher_hidden, kd_mask, kd_weight = _batch()
    teacher_weight = torch.randn(TEACHER_VOCAB, TEACHER_HIDDEN, generator=_gen(13))
    parts = make_distill_row_loss(_kd, teacher_weight)(logits, labels, teacher_hidden, kd_mask, kd_weight)
    valid = labels != -100
    expected_lm = (
        torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="mean") * valid.sum()
    )
    teacher_logits = teacher_hidden @ teacher_weight.T
    expected_kd = (kd_weight * _kd(logits, teacher_logits))[kd_mask].sum()
    torch.testing.assert_close(parts["lm"], expected_lm)
    torch.testing.assert_close(parts["kd"], expected_kd)
    assert make_distill_row_loss(None, None)(logits, labels, teacher_hidden, kd_mask, kd_weight).keys() == {
        "lm"
    }
    with pytest.raises(ValueError, match="teacher"):
        make_distill_row_loss(_kd, None)
