"""sakd's LM head against the models' own forward: logits, the chunked KD + LM loss and its gradients (fused and
autograd, live and cached teacher), and the start-up head check."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GraniteConfig,
    LlamaConfig,
)

from sakd.cache.capture import top_k_rows
from sakd.errors import UserError
from sakd.losses.chunked import chunked_head_loss, full_head_loss
from sakd.losses.fused import FusedCachedForwardKL, FusedForwardKL, same_vocab_target
from sakd.losses.kd import _same_vocab_kd
from sakd.losses.rows import make_cached_distill_row_loss, make_distill_row_loss
from sakd.losses.sparse import SparseTeacherSettings, sparse_teacher_divergence
from sakd.models.head import LogitTransform, ModelHead, check_head, head_logits, model_head
from sakd.models.load import capture_final_hidden

VOCAB, HIDDEN, BATCH, LENGTH = 48, 32, 2, 12
SMALL = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}


def _biased_llama(seed: int) -> nn.Module:
    """An untied Llama whose head has a bias (as some fine-tuned heads do)."""
    model = _build(LlamaConfig(**SMALL, **HEADS, tie_word_embeddings=False), seed)
    head = nn.Linear(HIDDEN, VOCAB, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.0)
    model.lm_head = head
    return model


def _build(config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # logits of several units, so that caps and scales change them visibly
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()


# Non-trivial scales and caps: a transform left out changes the logits by far more than the tolerance.
FAMILIES = {
    "gemma2": lambda seed: _build(Gemma2Config(**SMALL, **HEADS, final_logit_softcapping=3.0), seed),
    "gemma3_text": lambda seed: _build(Gemma3TextConfig(**SMALL, **HEADS, final_logit_softcapping=2.5), seed),
    "cohere": lambda seed: _build(CohereConfig(**SMALL, **HEADS, logit_scale=0.3), seed),
    "granite": lambda seed: _build(GraniteConfig(**SMALL, **HEADS, logits_scaling=3.5), seed),
    "llama_tied": lambda seed: _build(LlamaConfig(**SMALL, **HEADS, tie_word_embeddings=True), seed),
    "llama_untied": lambda seed: _build(LlamaConfig(**SMALL, **HEADS, tie_word_embeddings=False), seed),
    "llama_bias": _biased_llama,
}
TRANSFORMS = {
    "gemma2": LogitTransform(1.0, 3.0),
    "gemma3_text": LogitTransform(1.0, 2.5),
    "cohere": LogitTransform(0.3),
    "granite": LogitTransform(1 / 3.5),
    "llama_tied": LogitTransform(),
    "llama_untied": LogitTransform(),
    "llama_bias": LogitTransform(),
}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


def _hidden_and_logits(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The final hidden state (B, T, H) and the model's own logits (B, T, V) of one forward."""
    with capture_final_hidden(model) as out:
        logits = model(input_ids=ids, use_cache=False).logits
    return out["hidden"], logits


@pytest.mark.parametrize("family", FAMILIES)
def test_head_reproduces_the_models_logits(family):
    model = FAMILIES[family](0)
    head = model_head(model)
    assert head.transform == TRANSFORMS[family]
    with torch.no_grad():
        hidden, logits = _hidden_and_logits(model, _ids())
        ours = head_logits(hidden.flatten(0, 1), head)  # (B * T, V)
        torch.testing.assert_close(ours, logits.flatten(0, 1).float(), atol=1e-5, rtol=1e-5)
        if not head.transform.identity:
            linear = head_logits(hidden.flatten(0, 1), ModelHead(head.weight, head.bias))
            assert (linear - ours).abs().max() > 0.5  # the transform matters here


def _reference_loss(s_logits, t_logits, labels, kd_mask, kd_weight, temperature, weights):
    """LM + forward KL from full logits, written out plainly."""
    lm = F.cross_entropy(s_logits, labels, ignore_index=-100, reduction="sum")
    t = temperature
    logp = torch.log_softmax(t_logits / t, dim=-1)
    logq = torch.log_softmax(s_logits / t, dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * t**2
    kd = torch.where(kd_mask, kd_weight * kl, 0.0).sum()
    return weights["lm"] * lm + weights["kd"] * kd


def _rows(ids: torch.Tensor, seed: int = 3):
    """Labels (N,) of every position but each window's last; a KD mask and weights."""
    g = torch.Generator().manual_seed(seed)
    labels = ids[:, 1:].flatten()
    labels[torch.rand(labels.shape[0], generator=g) < 0.2] = -100
    kd_mask = torch.rand(labels.shape[0], generator=g) < 0.7
    kd_weight = torch.rand(labels.shape[0], generator=g) + 0.5
    return labels, kd_mask, kd_weight


def _student_grads(student, total) -> list[torch.Tensor]:
    params = [p for p in student.parameters() if p.requires_grad]
    return list(torch.autograd.grad(total, params, allow_unused=True))


def _assert_grads_close(grads, ref_grads):
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not g.any()
            continue
        # fp32 rounding relative to the largest gradient entry (heads scaled up give entries of ~100)
        torch.testing.assert_close(g, r, atol=1e-6 * (1.0 + float(r.abs().max())), rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_live_teacher_loss_and_gradients_match_full_logits(family, temperature):
    student, teacher = FAMILIES[family](0), FAMILIES[family](1)
    ids = _ids()
    labels, kd_mask, kd_weight = _rows(ids)
    weights = {"lm": 0.7, "kd": 1.3}
    hidden, s_logits = _hidden_and_logits(student, ids)
    with torch.no_grad():
        t_hidden, t_logits = _hidden_and_logits(teacher, ids)
    ref_total = _reference_loss(
        s_logits[:, :-1].flatten(0, 1),
        t_logits[:, :-1].flatten(0, 1),
        labels,
        kd_mask,
        kd_weight,
        temperature,
        weights,
    )
    ref_grads = _student_grads(student, ref_total)

    t_head = model_head(teacher)
    kd = functools.partial(_same_vocab_kd, VOCAB, "forward_kl", temperature=temperature)
    reference = make_distill_row_loss(kd, t_head)
    fused = FusedForwardKL(reference, same_vocab_target(VOCAB), t_head, None, temperature)
    row_inputs = [labels, t_hidden[:, :-1].flatten(0, 1), kd_mask, kd_weight]
    for row_loss in (reference, fused):
        hidden, _ = _hidden_and_logits(student, ids)
        rows = hidden[:, :-1].flatten(0, 1)
        total, _ = chunked_head_loss(rows, model_head(student), row_loss, row_inputs, weights, chunk_size=5)
        torch.testing.assert_close(total, ref_total, atol=1e-5, rtol=1e-5)
        _assert_grads_close(_student_grads(student, total), ref_grads)
    hidden, _ = _hidden_and_logits(student, ids)
    total, _ = full_head_loss(
        hidden[:, :-1].flatten(0, 1), model_head(student), reference, row_inputs, weights
    )
    torch.testing.assert_close(total, ref_total, atol=1e-5, rtol=1e-5)
    _assert_grads_close(_student_grads(student, total), ref_grads)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite", "llama_bias"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_teacher_loss_and_gradients_match_full_logits(family, temperature):
    """The cache holds the teacher's own top-k probabilities; the student's chunked loss against it (fused
    and autograd) equals the same sparse loss on the student's own full logits."""
    student, teacher = FAMILIES[family](0), FAMILIES[family](1)
    ids, k = _ids(), 8
    labels, kd_mask, kd_weight = _rows(ids)
    with torch.no_grad():
        t_hidden, t_logits = _hidden_and_logits(teacher, ids)
    t_rows = t_hidden[:, :-1].flatten(0, 1)
    top_ids, probs, tail = top_k_rows(t_rows, model_head(teacher), None, VOCAB, k)
    expected = torch.softmax(t_logits[:, :-1].flatten(0, 1), dim=-1).topk(k, dim=-1)
    torch.testing.assert_close(probs, expected.values, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tail, 1.0 - expected.values.sum(-1), atol=1e-6, rtol=1e-5)

    settings = SparseTeacherSettings(VOCAB, student_vocab=VOCAB)
    kd = functools.partial(sparse_teacher_divergence, temperature=temperature, settings=settings)
    reference = make_cached_distill_row_loss(kd)
    row_inputs = [labels, top_ids, probs, tail, kd_mask, kd_weight]
    weights = {"lm": 1.1, "kd": 0.6}
    _, s_logits = _hidden_and_logits(student, ids)
    parts = reference(s_logits[:, :-1].flatten(0, 1).float(), *row_inputs)
    ref_total = weights["lm"] * parts["lm"] + weights["kd"] * parts["kd"]
    ref_grads = _student_grads(student, ref_total)
    fused = FusedCachedForwardKL(reference, temperature, settings)
    for row_loss in (reference, fused):
        hidden, _ = _hidden_and_logits(student, ids)
        rows = hidden[:, :-1].flatten(0, 1)
        total, _ = chunked_head_loss(rows, model_head(student), row_loss, row_inputs, weights, chunk_size=7)
        torch.testing.assert_close(total, ref_total, atol=1e-5, rtol=1e-5)
        _assert_grads_close(_student_grads(student, total), ref_grads)


def test_scale_and_softcap_together_match_autograd():
    """Both steps of a transform (a scale, then a soft-cap) chain into the chunked gradients."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(19, 8, generator=g).requires_grad_()
    weight = (torch.randn(30, 8, generator=g) * 3).requires_grad_()
    bias = torch.randn(30, generator=g).requires_grad_()
    head = ModelHead(weight, bias, LogitTransform(0.6, 2.0))
    labels = torch.randint(0, 30, (19,), generator=g)
    row_loss = make_distill_row_loss(None, None)
    dummy = [torch.zeros(19, 1), torch.zeros(19, dtype=torch.bool), torch.ones(19)]
    total, _ = chunked_head_loss(hidden, head, row_loss, [labels, *dummy], {"lm": 1.0}, chunk_size=4)
    ref_total, _ = full_head_loss(hidden, head, row_loss, [labels, *dummy], {"lm": 1.0})
    plain = F.cross_entropy(torch.tanh(0.6 * (hidden @ weight.T + bias) / 2.0) * 2.0, labels, reduction="sum")
    torch.testing.assert_close(ref_total, plain)
    torch.testing.assert_close(total, ref_total)
    for a, b in zip(
        torch.autograd.grad(total, [hidden, weight, bias]),
        torch.autograd.grad(plain, [hidden, weight, bias]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_check_head_passes_and_logs_the_transform(family, caplog):
    model = FAMILIES[family](0)
    model.train()
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    mask[1, 7:] = 0  # padding is left out of the comparison
    with caplog.at_level(logging.INFO, logger="sakd"):
        head = check_head(model, _ids(), mask, "teacher")
    assert head.transform == TRANSFORMS[family]
    assert model.training  # the mode is restored
    line = [r.getMessage() for r in caplog.records if "head check passed" in r.getMessage()]
    assert line and type(model).__name__ in line[0] and TRANSFORMS[family].describe() in line[0]


def _scaled_forward(model: nn.Module, factor: float) -> nn.Module:
    """The model with an extra logit scale in its forward that sakd cannot know about."""
    original = model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        out.logits = out.logits * factor
        return out

    model.forward = forward
    return model


def test_check_head_refuses_an_unknown_transform():
    model = _scaled_forward(FAMILIES["llama_untied"](0), 1.3)
    with pytest.raises(
        UserError, match=r"the student's \(LlamaForCausalLM\) logits differ from sakd's head by"
    ):
        check_head(model, _ids(), None, "student")
