import json
import math

import pytest
import torch

from sakd.losses.divergence import divergence, forward_kl
from sakd.losses.taid import TAIDSchedule, taid_logprobs


def _logits(seed: int, rows: int = 6, vocab: int = 5) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _reference(student_logits, teacher_logits, temperature: float, t: float) -> torch.Tensor:
    """T^2 * KL(p_t || q_S) in float64, p_t from the raw logits (not log-probabilities), the student detached."""
    s, u = student_logits.double() / temperature, teacher_logits.double() / temperature
    target = torch.softmax((1 - t) * s.detach() + t * u, -1)
    logq = torch.log_softmax(s, -1)
    return (target * (target.log() - logq)).sum(-1) * temperature**2


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_taid_matches_logit_interpolation_values_and_gradients(t: float, temperature: float) -> None:
    student_ref = _logits(0).double().requires_grad_()
    expected = _reference(student_ref, _logits(1), temperature, t)
    expected.sum().backward()
    student = _logits(0).requires_grad_()
    teacher_logprobs = torch.log_softmax(_logits(1) / temperature, -1)
    rows = divergence("taid", student, teacher_logprobs, temperature, beta=t)
    rows.sum().backward()
    assert rows.shape == (6,) and rows.dtype == torch.float32
    torch.testing.assert_close(rows.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), student_ref.grad, rtol=1e-4, atol=1e-6)


def test_taid_ends_and_impossible_tokens() -> None:
    student, teacher = _logits(2), torch.log_softmax(_logits(3), -1)
    torch.testing.assert_close(
        divergence("taid", student, teacher, 1.0, 1.0), forward_kl(student, teacher, 1.0)
    )
    grad_student = student.clone().requires_grad_()
    rows = divergence("taid", grad_student, teacher, 1.0, 0.0)
    (grad,) = torch.autograd.grad(rows.sum(), grad_student)
    assert (rows == 0).all() and grad.abs().max() < 1e-6  # the target is the student itself
    # Tokens ruled out on either side (a teacher's -inf, a student's padding column): finite at every t.
    teacher_ruled = torch.log_softmax(teacher.masked_fill(torch.arange(5) == 1, -math.inf), -1)
    padded = torch.cat([student, torch.full((6, 1), -math.inf)], -1)
    teacher_padded = torch.cat([teacher_ruled, torch.full((6, 1), -math.inf)], -1)
    for t in [0.0, 0.5, 1.0]:
        grad_student = padded.clone().requires_grad_()
        rows = taid_logprobs(torch.log_softmax(grad_student, -1), teacher_padded, t)
        (grad,) = torch.autograd.grad(rows.sum(), grad_student)
        assert torch.isfinite(rows).all() and torch.isfinite(grad).all(), t
    with pytest.raises(ValueError, match="taid t"):
        taid_logprobs(teacher, teacher, 1.5)


def test_schedule_follows_hand_computed_sequence() -> None:
    schedule = TAIDSchedule(t_start=0.4, t_end=1.0, alpha=0.5, beta=0.5)
    # Step 1 only records the loss.
    assert schedule.update(2.0, step=1, total_steps=10) == 0.4
    # Step 2: change (2 - 1) / 2 = 0.5; momentum 0.5 * 0.5 = 0.25; sigmoid 0.5621765;
    # adaptive 0.4 + 0.5 * 0.5621765 * 0.6 = 0.5686530 beats the ramp 0.4 + 0.6 * 0.2 = 0.52.
    assert schedule.update(1.0, step=2, total_steps=10) == pytest.approx(0.5686530, abs=1e-7)
    # Step 3: loss rises to 1.5: change -0.5; momentum 0.125 - 0.25 = -0.125; sigmoid 0.4687906;
    # adaptive 0.5686530 + 0.5 * 0.4687906 * 0.4313470 = 0.6697587 beats the ramp 0.58.
    assert schedule.update(1.5, step=3, total_steps=10) == pytest.approx(0.6697587, abs=1e-7)
    # Step 8: change 0; momentum -0.0625; sigmoid 0.4843800; adaptive 0.6697587 + 0.5 * 0.48438 * 0.3302413
    # = 0.7497398 loses to the ramp 0.4 + 0.6 * 0.8 = 0.88.
    assert schedule.update(1.5, step=8, total_steps=10) == pytest.approx(0.88, abs=1e-12)
    # A skipped (NaN) step changes nothing; past the end t stays at t_end.
    before = schedule.state_dict()
    assert schedule.update(math.nan, step=9, total_steps=10) == pytest.approx(0.88)
    assert schedule.state_dict() == before
    assert schedule.update(0.1, step=12, total_steps=10) == 1.0


def test_schedule_without_adaptation_is_the_linear_ramp() -> None:
    schedule = TAIDSchedule(t_start=0.2, t_end=0.8, alpha=1.0, adaptive=False)
    schedule.update(3.0, 1, 4)
    values = [schedule.update(loss, step, 4) for step, loss in [(2, 1.0), (3, 0.5), (4, 0.1)]]
    assert values == pytest.approx([0.5, 0.65, 0.8])


def test_schedule_resumes_exactly_from_state_dict() -> None:
    losses = [3.0, 2.5, 2.7, 2.0, 1.9, 1.95, 1.5, 1.4, 1.45, 1.2]
    straight = TAIDSchedule(alpha=0.05, beta=0.9)
    expected = [straight.update(loss, step, 100) for step, loss in enumerate(losses, start=1)]
    first = TAIDSchedule(alpha=0.05, beta=0.9)
    resumed_values = [first.update(loss, step, 100) for step, loss in enumerate(losses[:5], start=1)]
    resumed = TAIDSchedule(alpha=0.05, beta=0.9)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # survives a JSON round trip
    resumed_values += [resumed.update(loss, step, 100) for step, loss in enumerate(losses[5:], start=6)]
    assert resumed_values == expected  # exactly, not approximately
    assert expected == sorted(expected) and expected[-1] > expected[0]


def test_schedule_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="t_start must be in .*alpha must be in"):
        TAIDSchedule(t_start=1.0, alpha=2.0)
    with pytest.raises(ValueError, match="must not exceed t_end"):
        TAIDSchedule(t_start=0.6, t_end=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        TAIDSchedule().update(1.0, 1, 0)
