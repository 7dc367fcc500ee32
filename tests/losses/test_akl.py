import math

import pytest
import torch

from sakd.losses.divergence import AKL_TOP_K, akl_logprobs, divergence, forward_kl, reverse_kl
from sakd.losses.sparse import SparseTeacherSettings, sparse_teacher_divergence


def _logits(seed: int, rows: int = 8, vocab: int = 5) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _reference_weights(student_logits, teacher_logits, temperature: float, mu: float) -> torch.Tensor:
    """g_head / (g_head + g_tail) per row, by explicit loops in float64 over a Python-sorted vocabulary."""
    q = torch.softmax(student_logits.double() / temperature, -1).tolist()
    p = torch.softmax(teacher_logits.double() / temperature, -1).tolist()
    weights = []
    for p_row, q_row in zip(p, q, strict=True):
        order = sorted(range(len(p_row)), key=lambda v: -p_row[v])
        head = tail = cumulative = 0.0
        for rank, v in enumerate(order):
            cumulative += p_row[v]
            if rank == 0 or cumulative <= mu:
                head += abs(p_row[v] - q_row[v])
            else:
                tail += abs(p_row[v] - q_row[v])
        weights.append(head / (head + tail))
    return torch.tensor(weights, dtype=torch.float64)


def _reference(student_logits, teacher_logits, temperature: float, mu: float) -> torch.Tensor:
    """T^2 * (w KL(p || q) + (1 - w) KL(q || p)) in float64, w a constant (detached)."""
    weight = _reference_weights(student_logits.detach(), teacher_logits, temperature, mu)
    logq = torch.log_softmax(student_logits.double() / temperature, -1)
    logp = torch.log_softmax(teacher_logits.double() / temperature, -1)
    forward = (logp.exp() * (logp - logq)).sum(-1)
    reverse = (logq.exp() * (logq - logp)).sum(-1)
    return (weight * forward + (1 - weight) * reverse) * temperature**2


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_akl_matches_loop_reference_values_and_gradients(mu: float, temperature: float) -> None:
    student_ref = _logits(0).double().requires_grad_()
    teacher = _logits(1)
    expected = _reference(student_ref, teacher, temperature, mu)
    expected.sum().backward()
    student = _logits(0).requires_grad_()
    teacher_logprobs = torch.log_softmax(teacher / temperature, -1)
    rows = divergence("akl", student, teacher_logprobs, temperature, beta=mu)
    rows.sum().backward()
    assert rows.shape == (8,) and rows.dtype == torch.float32
    torch.testing.assert_close(rows.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), student_ref.grad, rtol=1e-4, atol=1e-6)


def test_akl_top_k_shortcut_and_full_sort_fallback_match_loop_reference() -> None:
    """A vocabulary wider than AKL_TOP_K: peaked rows end their head inside the top-k, flat rows (top-k mass
    <= mu) fall back to sorting the whole row; both agree with the loop reference."""
    scale = torch.tensor([8.0, 8.0, 8.0, 0.1, 0.1, 0.1])[:, None]  # peaked rows, then flat rows
    teacher = _logits(9, rows=6, vocab=300) * scale
    student = _logits(10, rows=6, vocab=300)
    top_mass = torch.softmax(teacher, -1).topk(AKL_TOP_K, dim=-1).values.sum(-1)
    assert ((top_mass > 0.5) == torch.tensor([True] * 3 + [False] * 3)).all()
    rows = divergence("akl", student, torch.log_softmax(teacher, -1), 1.0, beta=0.5)
    torch.testing.assert_close(rows.double(), _reference(student, teacher, 1.0, 0.5), rtol=1e-5, atol=1e-6)


def test_akl_weights_select_forward_or_reverse_kl() -> None:
    """A student off only in the head is fitted by forward KL alone; off only in the tail, by reverse KL alone."""
    teacher = torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.1]]).log()  # mu = 0.55: head = the first two tokens
    head_only = torch.tensor([[0.2, 0.3, 0.2, 0.2, 0.1]]).log()
    tail_only = torch.tensor([[0.3, 0.2, 0.1, 0.2, 0.2]]).log()
    # Log-probabilities are their own logits, so the public functions at T = 1 give the plain KLs.
    torch.testing.assert_close(akl_logprobs(head_only, teacher, 0.55), forward_kl(head_only, teacher, 1.0))
    torch.testing.assert_close(akl_logprobs(tail_only, teacher, 0.55), reverse_kl(tail_only, teacher, 1.0))
    # Off in both: strictly between the two KLs' weightings, not either one.
    both = torch.tensor([[0.25, 0.25, 0.1, 0.2, 0.2]]).log()
    rows = akl_logprobs(both, teacher, 0.55)
    assert not torch.allclose(rows, forward_kl(both, teacher, 1.0))
    assert not torch.allclose(rows, reverse_kl(both, teacher, 1.0))


def test_akl_zero_and_finite_when_equal_or_padded() -> None:
    logits = _logits(2)
    rows = divergence("akl", logits + 3.0, torch.log_softmax(logits / 2.0, -1), 2.0)
    torch.testing.assert_close(rows, torch.zeros(8), atol=1e-5, rtol=0)
    # A padding column both sides rule out: finite value and gradient, equal to the loss without it.
    student = torch.cat([_logits(3), torch.full((8, 1), -math.inf)], -1).requires_grad_()
    teacher = torch.log_softmax(torch.cat([_logits(4), torch.full((8, 1), -math.inf)], -1), -1)
    rows = divergence("akl", student, teacher, 1.0)
    (grad,) = torch.autograd.grad(rows.sum(), student)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(rows.detach().double(), _reference(_logits(3), _logits(4), 1.0, 0.5))


def test_akl_nan_teacher_stays_nan_and_mu_is_checked() -> None:
    teacher = torch.log_softmax(_logits(5), -1)
    teacher[1, 2] = math.nan
    rows = akl_logprobs(torch.log_softmax(_logits(6), -1), teacher, 0.5)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    with pytest.raises(ValueError, match="mu"):
        akl_logprobs(teacher, teacher, 1.0)


@pytest.mark.parametrize("name, parameter", [("akl", 0.5), ("taid", 0.6)])
def test_top_k_teacher_covering_the_vocabulary_equals_the_dense_divergence(
    name: str, parameter: float
) -> None:
    """Through the cached teacher's top-k bucket path, where columns outside the buckets are -inf on both
    sides: with k = V (no tail) the value is the dense one."""
    student, teacher = _logits(7), _logits(8)
    probs = torch.softmax(teacher, -1)
    rows = sparse_teacher_divergence(
        student,
        torch.arange(5).expand(8, 5),
        probs,
        torch.zeros(8),
        2.0,
        settings=SparseTeacherSettings(5, name, student_vocab=5),
        beta=parameter,
    )
    dense = divergence(name, student, torch.log_softmax(teacher / 2.0, -1), 2.0, parameter)
    torch.testing.assert_close(rows, dense, rtol=1e-5, atol=1e-6)
