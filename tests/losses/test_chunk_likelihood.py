import math

import numpy as np
import pytest
import torch

from sakd.data.align import alignment_groups
from sakd.data.packing import Window, collate_windows
from sakd.data.tokenize import InputFormat
from sakd.losses.chunk_likelihood import chunk_likelihood_loss, chunk_logprobs, label_groups

STUDENT_VOCAB, TEACHER_VOCAB = 4, 6


def _binary_kl(log_a: float, log_b: float) -> float:
    a, b = math.exp(log_a), math.exp(log_b)
    return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))


def _reference_divergence(teacher: float, student: float, temperature, divergence, epsilon=1e-6) -> float:
    log_t, log_s = teacher / temperature - epsilon, student / temperature - epsilon
    return _binary_kl(log_t, log_s) if divergence == "binary_kl" else _binary_kl(log_s, log_t)


def _loop_reference(student_lp, student_group, teacher_lp, teacher_group, temperature, divergence):
    """{(row, group): loss} by explicit loops over positions, in float64."""
    sums: dict[tuple[str, int, int], float] = {}
    for side, logprobs, groups in [("s", student_lp, student_group), ("t", teacher_lp, teacher_group)]:
        for n in range(groups.shape[0]):
            for i in range(groups.shape[1]):
                g = int(groups[n, i])
                if g >= 0:
                    sums[(side, n, g)] = sums.get((side, n, g), 0.0) + float(logprobs[n, i])
    return {
        (n, g): _reference_divergence(sums[("t", n, g)], value, temperature, divergence)
        for (side, n, g), value in sums.items()
        if side == "s" and ("t", n, g) in sums
    }


def _assert_matches(loss, mask, expected: dict) -> None:
    assert {tuple(x) for x in mask.nonzero().tolist()} == set(expected)
    for (n, g), value in expected.items():
        assert loss[n, g].item() == pytest.approx(value, rel=1e-4, abs=1e-7), (n, g)
    assert (loss[~mask] == 0).all()


@pytest.mark.parametrize("divergence", ["binary_kl", "reverse_binary_kl"])
@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_matches_loop_reference_on_arbitrary_groups(divergence: str, temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student_group = torch.randint(-1, 5, (3, 11), generator=generator)
    teacher_group = torch.randint(-1, 6, (3, 8), generator=generator)
    student_lp = -torch.rand(3, 11, generator=generator) * 2
    teacher_lp = -torch.rand(3, 8, generator=generator) * 2
    # Positions without a group may hold anything: they must not leak into any sum.
    student_lp = torch.where(student_group < 0, -math.inf, student_lp)
    teacher_lp = torch.where(teacher_group < 0, math.nan, teacher_lp)
    loss, mask = chunk_likelihood_loss(
        student_lp, student_group, teacher_lp, teacher_group, temperature, divergence
    )
    assert loss.shape == mask.shape == (3, 6) and loss.dtype == torch.float32
    expected = _loop_reference(
        student_lp.double(), student_group, teacher_lp.double(), teacher_group, temperature, divergence
    )
    assert 3 < len(expected) < 18  # some groups matched, some only on one side
    _assert_matches(loss, mask, expected)


def _window(student_ends, teacher_ends, index: int, generator: torch.Generator) -> Window:
    teacher_group_ends, student_group_ends = alignment_groups(np.array(teacher_ends), np.array(student_ends))
    student_ids = torch.randint(0, STUDENT_VOCAB, (len(student_ends),), generator=generator).numpy()
    teacher_ids = torch.randint(0, TEACHER_VOCAB, (len(teacher_ends),), generator=generator).numpy()
    return Window(
        student_ids=student_ids,
        student_bytes=np.ones(len(student_ends), dtype=np.int64),
        student_group=np.repeat(np.arange(len(student_group_ends)), np.diff(student_group_ends, prepend=0)),
        teacher_ids=teacher_ids,
        teacher_bytes=np.ones(len(teacher_ends), dtype=np.int64),
        teacher_group=np.repeat(np.arange(len(teacher_group_ends)), np.diff(teacher_group_ends, prepend=0)),
        index=index,
    )


def _chunk_probability(logits, ids, labels, row: int, prefix: int, tokens: list[int]) -> float | None:
    """Product over the group's tokens of the full next-token distribution at the position before each, float64;
    None if a token is not predicted (the window's first token, or a label masked out of the loss)."""
    probability = 1.0
    for j in tokens:
        position = prefix + j - 1
        if j == 0 or labels[row, position] < 0:
            return None
        assert labels[row, position] == ids[j]
        probability *= torch.softmax(logits[row, position].double(), -1)[ids[j]].item()
    return probability


def test_collated_batch_matches_brute_force_chunk_likelihoods_and_reaches_every_student_position() -> None:
    """Real windows (different tokenizations of the same characters, a BOS only on the teacher side, padding, a
    label masked out): each matched group's chunk probability is the product of the full distributions'
    probabilities of its tokens; the loss is the binarised KL of those, and the gradient reaches every
    student position that predicts a token of a matched group, and no other."""
    generator = torch.Generator().manual_seed(1)
    windows = [
        _window([1, 2, 4, 5, 6, 8, 9], [2, 3, 4, 6, 7, 8, 9], 0, generator),
        _window([1, 3, 4], [2, 3, 4], 1, generator),
    ]
    batch = collate_windows(windows, InputFormat(pad_id=0), InputFormat(pad_id=0, prefix=(5,)))
    batch.teacher.labels[0, 1 + 4] = -100  # teacher token 5 of window 0 leaves the loss
    student_logits = torch.randn(*batch.student.input_ids.shape, STUDENT_VOCAB, generator=generator)
    student_logits.requires_grad_()
    teacher_logits = torch.randn(*batch.teacher.input_ids.shape, TEACHER_VOCAB, generator=generator)

    def label_logprobs(logits, labels):
        picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(labels < 0, 0.0, picked)

    student_group = label_groups(batch.student.group, batch.student.labels)
    teacher_group = label_groups(batch.teacher.group, batch.teacher.labels)
    loss, mask = chunk_likelihood_loss(
        label_logprobs(student_logits, batch.student.labels),
        student_group,
        label_logprobs(teacher_logits, batch.teacher.labels),
        teacher_group,
    )
    expected = {}
    for row, window in enumerate(windows):
        for g in range(int(window.student_group.max()) + 1):
            student = _chunk_probability(
                student_logits.detach(), window.student_ids, batch.student.labels, row, 0,
                np.flatnonzero(window.student_group == g).tolist(),
            )  # fmt: skip
            teacher = _chunk_probability(
                teacher_logits, window.teacher_ids, batch.teacher.labels, row, 1,
                np.flatnonzero(window.teacher_group == g).tolist(),
            )  # fmt: skip
            if student is not None and teacher is not None:
                expected[(row, g)] = _reference_divergence(
                    math.log(teacher), math.log(student), 100.0, "binary_kl"
                )
    # Window 0: group 0 spans two student tokens (its first is never predicted), group 3 lost a teacher label.
    assert set(expected) == {(0, 1), (0, 2), (0, 4), (1, 1)}
    _assert_matches(loss, mask, expected)
    # With the batch's group count given (no device sync) nothing changes.
    num_groups = batch.alignment.mask.shape[1]
    assert num_groups == loss.shape[1]
    given = label_groups(batch.student.group, batch.student.labels, num_groups=num_groups)
    torch.testing.assert_close(given, student_group)

    loss.sum().backward()
    reached = student_logits.grad.abs().sum(-1) > 0  # (B, Ls)
    torch.testing.assert_close(reached, mask.gather(1, student_group.clamp(min=0)) & (student_group >= 0))
    # Window 0: group 1 (1 position), group 2 (2), group 4 (1); window 1: group 1 (1).
    assert reached.sum() == 5


def test_label_groups_shift_and_drop_incomplete_groups() -> None:
    group = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1], [0, 1, 1, 2, -1, -1, -1, -1]])
    labels = torch.tensor([[-100, 7, 7, 7, 7, -100, 7, -100], [7, 7, 7, -100, -100, -100, -100, -100]])
    # Row 0: group 0's first token is not predicted, group 2's second token is masked out.
    # Row 1: group 0 is the window's first token alone (never predicted, so absent rather than partial).
    expected = torch.tensor([[-1, -1, 1, -1, -1, -1, -1, -1], [1, 1, 2, -1, -1, -1, -1, -1]])
    torch.testing.assert_close(label_groups(group, labels), expected)


def test_equal_chunks_give_zero_and_edge_cases() -> None:
    logprobs = -torch.rand(2, 5, generator=torch.Generator().manual_seed(2))
    groups = torch.tensor([[0, 0, 1, -1, 2], [0, 1, 1, 1, -1]])
    # The teacher splits the same chunks differently but gives them the same probabilities.
    sums, present = chunk_logprobs(logprobs, groups, 3)
    teacher = torch.stack([sums[0], sums[1]])
    teacher_groups = torch.tensor([[0, 1, 2], [0, 1, -1]])
    loss, mask = chunk_likelihood_loss(logprobs, groups, teacher, teacher_groups)
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(loss, torch.zeros(2, 3), atol=1e-6, rtol=0)
    # A chunk of probability 1 on both sides stays finite (epsilon), with a finite gradient.
    certain = torch.zeros(1, 2, requires_grad=True)
    loss, _ = chunk_likelihood_loss(certain, torch.tensor([[0, 0]]), torch.zeros(1, 1), torch.tensor([[0]]))
    (grad,) = torch.autograd.grad(loss.sum(), certain)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    empty, empty_mask = chunk_likelihood_loss(
        torch.zeros(2, 0),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0),
        torch.zeros(2, 0, dtype=torch.long),
    )
    assert empty.shape == empty_mask.shape == (2, 0)
    with pytest.raises(ValueError, match="unknown chunk divergence"):
        chunk_likelihood_loss(logprobs, groups, logprobs, groups, divergence="kl")
