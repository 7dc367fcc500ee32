"""The chunk-likelihood term inside the distillation objective, against a brute-force computation from both
models' full logits, and its refusal without a live teacher."""

from __future__ import annotations

import copy

import pytest
import torch

from sakd.config import validate
from sakd.curriculum import CurriculumSpec, curriculum_at
from sakd.errors import UserError
from sakd.losses import Chunking
from sakd.losses.chunk_likelihood import ChunkLikelihood, chunk_likelihood_loss, label_groups
from sakd.losses.kd import KDSettings, logit_kd, top_k_kd
from sakd.models.load import load_model, load_tokenizer
from sakd.train.objective import DistillObjective
from sakd.train.rows import LossNorm, TokenCounts
from sakd.train.step import CHUNK_LIKELIHOOD_WEIGHT, build_objective, chunk_likelihood
from sakd.train.teacher import LiveTeacher, TopKTeacher

NO_AUX = {"weights": {"token_weighting": 0.0}}


def _label_logprobs(model, side) -> torch.Tensor:
    """Each position's log-probability of its label from the model's own full logits (0 where ignored)."""
    labels = side.labels
    logits = model(input_ids=side.input_ids, attention_mask=side.attention_mask).logits.float()  # (B, L, V)
    picked = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return torch.where(labels == -100, 0.0, picked)


def _brute_force(student, teacher, batch, weight, temperature) -> torch.Tensor:
    """weight * temperature * the binary KL per matched group, summed, from the models' own forward passes."""
    with torch.no_grad():
        t_lp = _label_logprobs(teacher, batch.teacher)
    s_lp = _label_logprobs(student, batch.student)
    groups = batch.alignment.mask.shape[1]
    loss, matched = chunk_likelihood_loss(
        s_lp,
        label_groups(batch.student.group, batch.student.labels, num_groups=groups),
        t_lp,
        label_groups(batch.teacher.group, batch.teacher.labels, num_groups=groups),
        temperature,
        num_groups=groups,
    )
    assert matched.sum() > batch.alignment.mask.sum() // 2  # most groups are matched on both sides
    return weight * temperature * loss.sum()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_objective_term_equals_brute_force(cross_setup, assets, fused, temperature):
    """Objective with the term = objective without it + the term computed from full logits: the same
    gradients (fused closed-form and autograd row losses), and the logged part is the term's value."""
    teacher, teacher_tok, student_tok, batch = cross_setup
    student = load_model(str(assets["student"]), "student")
    point = curriculum_at(0.0, CurriculumSpec(**NO_AUX))
    norm = LossNorm(TokenCounts.of([batch]))
    weight = 0.7
    source = LiveTeacher(
        teacher, logit_kd(KDSettings("forward_kl", 0.5, "projection", fused), teacher_tok, student_tok)
    )
    chunking = Chunking(37)  # several chunks, and groups across chunk boundaries

    def grads(objective, extra=None):
        loss, parts = objective(student, batch, point, norm)
        if extra is not None:
            loss = loss + extra(student)
        loss.backward()
        out = [p.grad.clone() for p in student.parameters()]
        student.zero_grad(set_to_none=True)
        return out, parts, loss.item()

    term = ChunkLikelihood(weight, temperature)
    with_term, parts, value = grads(DistillObjective(source, chunking, likelihood=term))
    scale = point.weights["kd"] / norm.counts.kd
    expected, _, expected_value = grads(
        DistillObjective(source, chunking),
        lambda model: scale * _brute_force(model, teacher, batch, weight, temperature),
    )
    for got, want in zip(with_term, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    reference = _brute_force(student, teacher, batch, 1.0, temperature).item() / norm.counts.kd
    assert float(parts["alm"]) == pytest.approx(reference, rel=1e-4)
    assert float(parts["alm"]) > 0
    assert value == pytest.approx(expected_value, rel=1e-5)  # the loss carries the term's value
    without, _, _ = grads(DistillObjective(source, chunking))
    assert any(not torch.allclose(a, b) for a, b in zip(with_term, without, strict=True))


def test_refused_without_a_live_teacher(base_config, assets):
    raw = copy.deepcopy(base_config)
    raw["distill"] = {"chunk_likelihood_weight": 1.0}
    cfg = validate(raw)
    student_tok = load_tokenizer(str(assets["student"]), "s")
    teacher_tok = load_tokenizer(str(assets["teacher"]), "t")
    with pytest.raises(UserError, match="live teacher"):
        build_objective(cfg, None, student_tok, teacher_tok, None, None)
    cached = TopKTeacher(top_k_kd(KDSettings.of(cfg.distill), teacher_tok, student_tok))
    with pytest.raises(UserError, match="top-k"):
        cached.label_logprobs(None, None, Chunking())


def test_on_by_default_across_tokenizers_with_the_live_teacher_only(base_config):
    cfg = validate(base_config)
    assert cfg.distill.chunk_likelihood_weight is None
    assert chunk_likelihood(cfg, live=True, one_vocabulary=False).weight == CHUNK_LIKELIHOOD_WEIGHT
    assert chunk_likelihood(cfg, live=True, one_vocabulary=True) is None  # every position has the teacher
    assert chunk_likelihood(cfg, live=False, one_vocabulary=False) is None  # a cache: off, not refused
    raw = copy.deepcopy(base_config)
    raw["distill"] = {"chunk_likelihood_weight": 0.0}
    assert chunk_likelihood(validate(raw), live=True, one_vocabulary=False) is None
    raw["distill"] = {"chunk_likelihood_weight": 0.3}
    assert chunk_likelihood(validate(raw), live=True, one_vocabulary=True).weight == 0.3  # asked for


def test_a_faded_kd_leaves_the_teacher_idle(cross_setup, assets):
    """Once KD has faded to 0 (`kd_fade_until`), the step is training alone: the teacher never runs, and the
    loss and its gradients are the LM-only objective's."""
    teacher, teacher_tok, student_tok, batch = cross_setup
    student = load_model(str(assets["student"]), "student")
    spec = CurriculumSpec(**NO_AUX, kd_end=0.0, kd_fade_until=0.5)
    norm = LossNorm(TokenCounts.of([batch]))
    source = LiveTeacher(
        teacher, logit_kd(KDSettings("forward_kl", 0.5, "projection", False), teacher_tok, student_tok)
    )
    calls = []
    run = source.run
    source.run = lambda *args: calls.append(1) or run(*args)
    objective = DistillObjective(source, Chunking(37), likelihood=ChunkLikelihood(1.0, 1.0))

    def loss_and_grads(objective, progress):
        loss, parts = objective(student, batch, curriculum_at(progress, spec), norm)
        loss.backward()
        grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad(set_to_none=True)
        return loss.item(), grads, parts

    _, _, parts = loss_and_grads(objective, 0.25)
    assert calls and "kd" in parts and "alm" in parts  # KD at half its weight: the teacher runs
    calls.clear()
    faded, faded_grads, parts = loss_and_grads(objective, 0.75)
    assert not calls and set(parts) == {"lm"}
    alone, alone_grads, _ = loss_and_grads(DistillObjective(None, Chunking(37)), 0.75)
    assert faded == pytest.approx(alone, rel=1e-6)
    for got, want in zip(faded_grads, alone_grads, strict=True):
        torch.testing.assert_close(got, want)
