import math

import pytest
import torch

from sakd.errors import UserError
from sakd.losses.divergence import (
    DIVERGENCES,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    total_variation,
)

TEMPERATURES = [1.0, 2.0, 0.5]


def _logits(seed: int, rows: int = 6, vocab: int = 11) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _reference(
    name: str, student_logits, teacher_logits, temperature: float, beta: float = 0.5
) -> torch.Tensor:
    """Direct textbook formulas in float64."""
    q = torch.softmax(student_logits.double() / temperature, -1)
    p = torch.softmax(teacher_logits.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        return kl(p, q) * temperature**2
    if name == "reverse_kl":
        return kl(q, p) * temperature**2
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) * temperature**2
    if name == "skew_kl":  # beta is the skew alpha
        return kl(p, beta * p + (1 - beta) * q) * temperature**2
    if name == "skew_rkl":
        return kl(q, beta * q + (1 - beta) * p) * temperature**2
    return 0.5 * (p - q).abs().sum(-1)


def _teacher_logprobs(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(teacher_logits / temperature, -1)


ALL = ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_matches_float64_formula(name: str, temperature: float) -> None:
    student, teacher = _logits(0), _logits(1)
    rows = divergence(name, student, _teacher_logprobs(teacher, temperature), temperature)
    assert rows.shape == (6,) and rows.dtype == torch.float32
    torch.testing.assert_close(
        rows.double(), _reference(name, student, teacher, temperature), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_matches_formula(beta: float) -> None:
    student, teacher = _logits(2), _logits(3)
    rows = generalized_jsd(student, _teacher_logprobs(teacher, 2.0), 2.0, beta)
    torch.testing.assert_close(
        rows.double(), _reference("jsd", student, teacher, 2.0, beta), rtol=1e-5, atol=1e-6
    )


def test_public_functions_match_dispatcher() -> None:
    student, teacher = _logits(4), _teacher_logprobs(_logits(5), 1.5)
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd", "tvd"}
    torch.testing.assert_close(
        forward_kl(student, teacher, 1.5), divergence("forward_kl", student, teacher, 1.5)
    )
    torch.testing.assert_close(
        reverse_kl(student, teacher, 1.5), divergence("reverse_kl", student, teacher, 1.5)
    )
    torch.testing.assert_close(
        total_variation(student, teacher, 1.5), divergence("tvd", student, teacher, 1.5)
    )


@pytest.mark.parametrize("name", ALL)
def test_zero_when_distributions_equal(name: str) -> None:
    logits = _logits(6)
    # Shifting logits by a per-row constant leaves the distribution unchanged.
    rows = divergence(name, logits + 7.0, _teacher_logprobs(logits, 2.0), 2.0)
    torch.testing.assert_close(rows, torch.zeros(6), atol=1e-5, rtol=0)


def test_hinton_scaling_only_for_kl_family() -> None:
    student, teacher = _logits(7), _logits(8)
    for name in ["forward_kl", "reverse_kl", "jsd"]:
        unscaled = _reference(name, student, teacher, 3.0) / 9.0
        scaled = divergence(name, student, _teacher_logprobs(teacher, 3.0), 3.0)
        torch.testing.assert_close(scaled.double(), unscaled * 9.0, rtol=1e-5, atol=1e-6)
    tvd = divergence("tvd", student, _teacher_logprobs(teacher, 3.0), 3.0)
    assert (tvd <= 1.0).all()


def test_teacher_impossible_tokens() -> None:
    student = _logits(9).requires_grad_()
    teacher = _teacher_logprobs(_logits(10), 1.0)
    teacher[:, :4] = -math.inf
    teacher = torch.log_softmax(teacher, -1)  # renormalise over the possible tokens
    for name in ["forward_kl", "jsd", "tvd"]:
        rows = divergence(name, student, teacher, 1.0)
        assert torch.isfinite(rows).all(), name
        (grad,) = torch.autograd.grad(rows.sum(), student)
        assert torch.isfinite(grad).all(), name
    # Reference: forward KL only sums over the possible tokens.
    p = teacher.double().exp()
    q = torch.softmax(student.detach().double(), -1)
    expected = (p[:, 4:] * (p[:, 4:].log() - q[:, 4:].log())).sum(-1)
    torch.testing.assert_close(
        forward_kl(student, teacher, 1.0).detach().double(), expected, rtol=1e-5, atol=1e-6
    )
    # The student does put mass where the teacher has none: reverse KL is truly infinite, not hidden.
    assert torch.isinf(reverse_kl(student, teacher, 1.0)).all()


def test_token_impossible_for_both_sides() -> None:
    # A student vocabulary padding column masked to -inf, which the teacher also rules out.
    student = torch.tensor([[0.0, 1.0, -math.inf], [2.0, -1.0, -math.inf]]).requires_grad_()
    teacher = torch.log_softmax(torch.tensor([[1.0, 0.5, -math.inf], [0.0, 0.0, -math.inf]]), -1)
    for name in ["forward_kl", "jsd", "tvd"]:
        rows = divergence(name, student, teacher, 1.0)
        (grad,) = torch.autograd.grad(rows.sum(), student)
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all(), name
        expected = _reference(name, student.detach()[:, :2], teacher[:, :2], 1.0)
        torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)


def test_jsd_beta_ends_are_forward_and_reverse_kl() -> None:
    student, teacher = _logits(11), _teacher_logprobs(_logits(12), 2.0)
    torch.testing.assert_close(
        generalized_jsd(student, teacher, 2.0, beta=0.0), forward_kl(student, teacher, 2.0)
    )
    torch.testing.assert_close(
        generalized_jsd(student, teacher, 2.0, beta=1.0), reverse_kl(student, teacher, 2.0)
    )


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_finite_and_fp32(name: str, dtype: torch.dtype) -> None:
    student = _logits(13).to(dtype).requires_grad_()
    rows = divergence(name, student, _teacher_logprobs(_logits(14), 2.0), 2.0)
    assert rows.dtype == torch.float32
    (grad,) = torch.autograd.grad(rows.sum(), student)
    assert grad.dtype == dtype and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_forward_kl_gradient_matches_float64() -> None:
    student = _logits(15).double().requires_grad_()
    teacher = _logits(16).double()
    _reference("forward_kl", student, teacher, 2.0).sum().backward()
    ours = _logits(15).requires_grad_()
    forward_kl(ours, _teacher_logprobs(teacher.float(), 2.0), 2.0).sum().backward()
    torch.testing.assert_close(ours.grad.double(), student.grad, rtol=1e-4, atol=1e-6)


def test_errors() -> None:
    student, teacher = _logits(17), _teacher_logprobs(_logits(18), 1.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence("kl", student, teacher, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        divergence("forward_kl", student, teacher, 0.0)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student, teacher, 1.0, beta=1.5)
    # Failure mode 8: different vocabularies get an actionable error, not a crash deep in torch.
    with pytest.raises(UserError, match="cross-vocabulary"):
        forward_kl(torch.randn(3, 151), torch.log_softmax(torch.randn(3, 49), -1), 1.0)


def test_nan_teacher_is_never_hidden():
    """A NaN in the teacher propagates to the loss, never turned into a finite value (the trainer then skips
    the step)."""
    import torch

    from sakd.losses.divergence import DIVERGENCES

    student = torch.randn(3, 7)
    teacher = torch.log_softmax(torch.randn(3, 7), -1)
    teacher[1, 2] = float("nan")
    for name in DIVERGENCES:
        rows = DIVERGENCES[name](student, teacher, 1.0)
        assert torch.isnan(rows[1]), name
        assert torch.isfinite(rows[[0, 2]]).all(), name


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("name", ["skew_kl", "skew_rkl"])
def test_skew_divergences_match_formula_and_gradient(name: str, alpha: float) -> None:
    """DistiLLM's skew KL and skew reverse KL, values and gradients, against float64 formulas."""
    student, teacher = _logits(20).double().requires_grad_(), _logits(21).double()
    _reference(name, student, teacher, 2.0, alpha).sum().backward()
    ours = _logits(20).requires_grad_()
    rows = divergence(name, ours, _teacher_logprobs(teacher.float(), 2.0), 2.0, beta=alpha)
    rows.sum().backward()
    expected = _reference(name, student, teacher, 2.0, alpha).detach()
    torch.testing.assert_close(rows.detach().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.grad.double(), student.grad, rtol=1e-4, atol=1e-6)


def test_skew_ends_and_bounds() -> None:
    """alpha = 0 is forward (reverse) KL; skew KL is at most T^2 log(1 / alpha); skew reverse KL stays finite
    where the teacher rules tokens out (a projected teacher does), where reverse KL is infinite."""
    student, teacher = _logits(22), _teacher_logprobs(_logits(23) * 4, 1.0)
    torch.testing.assert_close(
        divergence("skew_kl", student, teacher, 1.0, 0.0), forward_kl(student, teacher, 1.0)
    )
    torch.testing.assert_close(
        divergence("skew_rkl", student, teacher, 1.0, 0.0), reverse_kl(student, teacher, 1.0)
    )
    assert (divergence("skew_kl", student * 10, teacher, 2.0, 0.1) <= 4 * math.log(10) + 1e-5).all()
    ruled_out = torch.log_softmax(teacher.masked_fill(torch.arange(11) < 4, -math.inf), -1)
    grad_student = student.clone().requires_grad_()
    rows = divergence("skew_rkl", grad_student, ruled_out, 1.0, 0.1)
    (grad,) = torch.autograd.grad(rows.sum(), grad_student)
    assert torch.isfinite(rows).all() and torch.isfinite(grad).all()
    assert torch.isinf(reverse_kl(student, ruled_out, 1.0)).all()
