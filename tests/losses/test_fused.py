"""The fused forward-KL row loss (closed-form logit gradients) against the autograd path it replaces."""

from __future__ import annotations

import functools

import pytest
import torch

from sakd.losses.chunked import ChunkBuffers, chunked_head_loss
from sakd.losses.cross_vocab import projected_divergence
from sakd.losses.fused import FusedForwardKL, projected_target, same_vocab_target, softmax_and_log
from sakd.losses.kd import _same_vocab_kd
from sakd.losses.rows import make_distill_row_loss
from sakd.losses.vocab_mapping import VocabMapping
from sakd.models.head import ModelHead

ROWS, HIDDEN, TEACHER_HIDDEN = 41, 16, 12
VOCAB, STUDENT_WIDTH, TEACHER_WIDTH = 50, 56, 64  # model heads padded beyond the tokenizer


def _inputs(seed: int, teacher_width: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=g).requires_grad_()
    weight = (torch.randn(STUDENT_WIDTH, HIDDEN, generator=g) * 0.5).requires_grad_()
    bias = torch.randn(STUDENT_WIDTH, generator=g).requires_grad_()
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    labels[torch.rand(ROWS, generator=g) < 0.3] = -100
    teacher_hidden = torch.randn(ROWS, TEACHER_HIDDEN, generator=g)
    kd_mask = torch.rand(ROWS, generator=g) < 0.7
    kd_weight = torch.rand(ROWS, generator=g) + 0.5
    teacher_weight = torch.randn(teacher_width, TEACHER_HIDDEN, generator=g)
    teacher_bias = torch.randn(teacher_width, generator=g)
    return (hidden, weight, bias), [labels, teacher_hidden, kd_mask, kd_weight], teacher_weight, teacher_bias


def _mapping(teacher_vocab: int) -> VocabMapping:
    g = torch.Generator().manual_seed(7)
    to_student = torch.randint(0, VOCAB, (teacher_vocab,), generator=g)
    to_student[torch.rand(teacher_vocab, generator=g) < 0.2] = -1  # unmapped teacher tokens
    none = torch.zeros(0, dtype=torch.long)
    return VocabMapping(to_student, none, none, teacher_vocab, VOCAB, 0.8)


def _run(row_loss, params, row_inputs, weights, chunk):
    hidden, weight, bias = params
    total, parts = chunked_head_loss(hidden, ModelHead(weight, bias), row_loss, row_inputs, weights, chunk)
    return total, parts, torch.autograd.grad(total, [hidden, weight, bias])


def _check(
    kd, target, temperature, chunk, weights, seed=0, teacher_width=TEACHER_WIDTH, jsd_beta=None, masked=0
):
    """The fused loss against its reference; `masked`: that many teacher logits are -inf (probability 0)."""
    params, row_inputs, t_weight, t_bias = _inputs(seed, teacher_width)
    t_bias[:masked] = float("-inf")
    reference = make_distill_row_loss(kd, t_weight, t_bias)
    fused = FusedForwardKL(reference, target, t_weight, t_bias, temperature, jsd_beta)
    total, parts, grads = _run(fused, params, row_inputs, weights, chunk)
    ref_total, ref_parts, ref_grads = _run(reference, params, row_inputs, weights, chunk)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    assert parts.keys() == ref_parts.keys()
    for k in parts:
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [7, 1000])
def test_same_vocabulary_matches_autograd(temperature, chunk):
    kd = functools.partial(_same_vocab_kd, VOCAB, "forward_kl", temperature=temperature)
    _check(kd, same_vocab_target(VOCAB), temperature, chunk, {"lm": 0.7, "kd": 1.3})


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_projection_matches_autograd(temperature):
    mapping = _mapping(60)
    kd = functools.partial(projected_divergence, mapping=mapping, temperature=temperature)
    _check(kd, projected_target(mapping, STUDENT_WIDTH), temperature, 9, {"lm": 1.0, "kd": 0.4})


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_autograd(beta, temperature):
    """The closed-form JSD gradient, same vocabulary (padded and unpadded student) and projected."""
    kd = functools.partial(_same_vocab_kd, VOCAB, "jsd", temperature=temperature, beta=beta)
    _check(kd, same_vocab_target(VOCAB), temperature, 7, {"lm": 0.7, "kd": 1.3}, jsd_beta=beta)
    kd = functools.partial(_same_vocab_kd, STUDENT_WIDTH, "jsd", temperature=temperature, beta=beta)
    _check(kd, same_vocab_target(STUDENT_WIDTH), temperature, 1000, {"lm": 1.0, "kd": 1.0}, jsd_beta=beta)
    mapping = _mapping(60)  # unmapped teacher tokens: the projected rows carry less than all the mass
    kd = functools.partial(
        projected_divergence, mapping=mapping, temperature=temperature, divergence="jsd", beta=beta
    )
    _check(
        kd, projected_target(mapping, STUDENT_WIDTH), temperature, 9, {"lm": 1.0, "kd": 0.4}, jsd_beta=beta
    )


@pytest.mark.parametrize("beta", [None, 0.5])
def test_teacher_probabilities_of_zero_add_nothing(beta):
    """Columns the teacher gives -inf logits (probability 0, log-probability -inf) add 0 to the divergence, as
    in the reference, and no NaN: the in-place p * (log p - log q) must not compute 0 * -inf."""
    divergence = "forward_kl" if beta is None else "jsd"
    kd = functools.partial(_same_vocab_kd, VOCAB, divergence, temperature=1.0, beta=beta or 0.5)
    _check(kd, same_vocab_target(VOCAB), 1.0, 7, {"lm": 0.7, "kd": 1.3}, jsd_beta=beta, masked=9)


def test_softmax_and_log_is_torchs():
    x = torch.randn(5, 300) * 8
    x[0, :10] = float("-inf")
    p, logp = softmax_and_log(x.clone())
    torch.testing.assert_close(p, torch.softmax(x, -1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logp, torch.log_softmax(x, -1), rtol=1e-6, atol=1e-6)


def test_the_fused_jsd_refuses_its_ends():
    with pytest.raises(ValueError, match="strictly between"):
        FusedForwardKL(None, same_vocab_target(VOCAB), torch.zeros(3, 2), None, 1.0, 1.0)


def test_same_vocabulary_unpadded_student_shares_the_softmax():
    """T = 1 over every student column: the KD softmax is the cross-entropy's (the shared branch)."""
    kd = functools.partial(_same_vocab_kd, STUDENT_WIDTH, "forward_kl", temperature=1.0)
    target = same_vocab_target(STUDENT_WIDTH)
    _check(kd, target, 1.0, 10, {"lm": 0.7, "kd": 1.3})


def test_zero_weights_and_lm_only():
    kd = functools.partial(_same_vocab_kd, VOCAB, "forward_kl", temperature=1.0)
    _check(kd, same_vocab_target(VOCAB), 1.0, 8, {"lm": 1.0, "kd": 0.0})
    _check(kd, same_vocab_target(VOCAB), 1.0, 8, {"lm": 0.0, "kd": 1.0})


def test_a_nan_teacher_is_not_zeroed():
    params, row_inputs, t_weight, t_bias = _inputs(3, TEACHER_WIDTH)
    row_inputs[1][0, 0] = float("nan")
    row_inputs[2][0] = True
    kd = functools.partial(_same_vocab_kd, VOCAB, "forward_kl", temperature=1.0)
    fused = FusedForwardKL(
        make_distill_row_loss(kd, t_weight, t_bias), same_vocab_target(VOCAB), t_weight, t_bias, 1.0
    )
    total, parts, grads = _run(fused, params, row_inputs, {"lm": 1.0, "kd": 1.0}, 8)
    assert torch.isnan(parts["kd"]) and torch.isnan(total)
    assert torch.isnan(grads[1]).any()


def test_rows_outside_the_kd_mask_ignore_their_teacher_rows():
    """A non-finite teacher row that is not distilled must not reach the gradient (the reference never
    computes it)."""
    params, row_inputs, t_weight, t_bias = _inputs(4, TEACHER_WIDTH)
    row_inputs[2][:3] = False
    row_inputs[1][:3] = float("inf")
    kd = functools.partial(_same_vocab_kd, VOCAB, "forward_kl", temperature=1.0)
    reference = make_distill_row_loss(kd, t_weight, t_bias)
    fused = FusedForwardKL(reference, same_vocab_target(VOCAB), t_weight, t_bias, 1.0)
    weights = {"lm": 1.0, "kd": 1.0}
    total, _, grads = _run(fused, params, row_inputs, weights, 8)
    ref_total, _, ref_grads = _run(reference, params, row_inputs, weights, 8)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def _cached_inputs(seed: int, k: int, teacher_vocab: int):
    g = torch.Generator().manual_seed(seed)
    (hidden, weight, bias), (labels, _, kd_mask, kd_weight), _, _ = _inputs(seed, TEACHER_WIDTH)
    ids = torch.stack([torch.randperm(teacher_vocab, generator=g)[:k] for _ in range(ROWS)])
    probs = torch.rand(ROWS, k, generator=g).sort(dim=-1, descending=True).values
    probs = probs / probs.sum(-1, keepdim=True) * (0.5 + 0.5 * torch.rand(ROWS, 1, generator=g))
    tail = 1.0 - probs.sum(-1)
    ids[0], probs[0], tail[0] = 0, 0.0, 0.0  # a window position the cache did not cover: no teacher mass
    kd_mask[0] = True
    row_inputs = [labels, ids, probs.half().float(), tail, kd_mask, kd_weight]
    return (hidden, weight, bias), row_inputs


def _check_cached(kd_kwargs, temperature, k, teacher_vocab, weights, seed=0, mutate=None):
    from sakd.losses.fused import FusedCachedForwardKL
    from sakd.losses.rows import make_cached_distill_row_loss
    from sakd.losses.sparse import SparseTeacherSettings, sparse_teacher_divergence

    params, row_inputs = _cached_inputs(seed, k, teacher_vocab)
    if mutate:
        mutate(row_inputs)
    settings = SparseTeacherSettings(teacher_vocab, **kd_kwargs)
    kd = functools.partial(sparse_teacher_divergence, settings=settings)
    reference = make_cached_distill_row_loss(functools.partial(kd, temperature=temperature))
    fused = FusedCachedForwardKL(reference, temperature, settings)
    total, parts, grads = _run(fused, params, row_inputs, weights, 11)
    ref_total, ref_parts, ref_grads = _run(reference, params, row_inputs, weights, 11)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    for key in ref_parts:
        torch.testing.assert_close(parts[key], ref_parts[key], rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_same_vocabulary_matches_autograd(temperature):
    _check_cached({"student_vocab": VOCAB}, temperature, 8, VOCAB, {"lm": 0.7, "kd": 1.3})


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_cached_projection_matches_autograd(temperature):
    """Teacher ids land on student columns with duplicates and unmapped ones; every student column counts."""
    mapping = _mapping(60)
    kwargs = {"teacher_to_student": mapping.teacher_to_student}
    _check_cached(kwargs, temperature, 12, 60, {"lm": 1.0, "kd": 0.5})


def test_cached_top_k_covering_the_vocabulary():
    """k = vocabulary: no tail bucket (the student's rest has no mass to compare)."""

    def full_cover(row_inputs):
        row_inputs[3].zero_()

    _check_cached({"student_vocab": VOCAB}, 1.0, VOCAB, VOCAB, {"lm": 1.0, "kd": 1.0}, mutate=full_cover)


@pytest.mark.parametrize("k", [1, 12, 64])
def test_vectorised_row_sort_is_torch_stable_sort(k):
    """The int32-key numpy sort gives torch's stable sort: values and order, ties (duplicate columns, the
    `width` of unmapped entries) in their original order."""
    from sakd.losses.sparse import sort_rows

    width = 50
    columns = torch.randint(0, width + 1, (37, k), generator=torch.Generator().manual_seed(k))
    columns[0] = width  # a row of unmapped entries only
    expected = columns.sort(dim=-1, stable=True)
    for vectorised in (True, False):
        values, order = sort_rows(columns, width, vectorised=vectorised)
        assert values.dtype == order.dtype == torch.int64
        assert torch.equal(values, expected.values) and torch.equal(order, expected.indices)


@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_chunk_buffers_change_nothing_and_are_kept(fused, projected):
    """Chunks written into kept buffers give bit-identical losses and gradients, with one vocabulary and
    across tokenizers; a later, smaller call takes rows of the same buffers."""
    if projected:
        mapping = _mapping(TEACHER_WIDTH)
        kd = functools.partial(projected_divergence, mapping=mapping, temperature=1.0)
        target = projected_target(mapping, STUDENT_WIDTH)
    else:
        kd = functools.partial(_same_vocab_kd, VOCAB, "forward_kl", temperature=1.0)
        target = same_vocab_target(VOCAB)
    buffers = ChunkBuffers()
    kept = None
    for seed, rows in ((0, ROWS), (1, ROWS - 9)):
        (hidden, weight, bias), row_inputs, t_weight, t_bias = _inputs(seed, TEACHER_WIDTH)
        reference = make_distill_row_loss(kd, t_weight, t_bias)
        row_loss = FusedForwardKL(reference, target, t_weight, t_bias, 1.0)
        row_loss = row_loss if fused else reference
        inputs = [t[:rows] for t in row_inputs]
        results = []
        for chunk_buffers in (None, buffers):
            total, parts = chunked_head_loss(
                hidden[:rows],
                ModelHead(weight, bias),
                row_loss,
                inputs,
                {"lm": 0.7, "kd": 1.3},
                7,
                buffers=chunk_buffers,
            )
            results.append((total, parts, torch.autograd.grad(total, [hidden, weight, bias])))
        (total, parts, grads), (b_total, b_parts, b_grads) = results
        assert torch.equal(total, b_total) and parts.keys() == b_parts.keys()
        assert all(torch.equal(parts[k], b_parts[k]) for k in parts)
        assert all(torch.equal(g, b) for g, b in zip(grads, b_grads, strict=True))
        pointers = {name: t.data_ptr() for name, t in buffers._kept.items()}
        fused_kept = {"logits", "grad", "teacher_logits", "teacher_probs"}
        assert set(pointers) == (fused_kept if fused else {"logits"})
        assert kept is None or pointers == kept
        kept = pointers


def _brute_force_bucket_kl(logits, ids, probs, tail, temperature, teacher_vocab, student_vocab, to_student):
    """T^2 * forward KL on the k + 1 buckets in float64, student tail as a sum over the columns outside the
    top-k's: the definition `sparse_teacher_divergence` approximates in fp32. -> rows (n,)."""
    from sakd.losses.sparse import sparse_teacher_buckets

    logp, log_tail, targets = sparse_teacher_buckets(ids, probs, tail, temperature, teacher_vocab, to_student)
    student = logits.double() if to_student is not None else logits.double()[:, :student_vocab]
    logq = torch.log_softmax(student / temperature, dim=-1)
    rows = []
    for r in range(logits.shape[0]):
        mass: dict[int, torch.Tensor] = {}
        for column, lp in zip(targets[r].tolist(), logp[r].double(), strict=True):
            if column >= 0:
                mass[column] = mass.get(column, 0.0) + lp.exp()
        outside = [j for j in range(logq.shape[1]) if j not in mass]
        teacher_tail = log_tail[r].double().exp() if outside else torch.zeros((), dtype=torch.float64)
        total = sum(mass.values()) + teacher_tail
        kl = sum(m / total * ((m / total).log() - logq[r, j]) for j, m in mass.items())
        if teacher_tail > 0:
            tail_p = teacher_tail / total
            kl = kl + tail_p * (tail_p.log() - torch.logsumexp(logq[r, outside], dim=0))
        rows.append(kl * temperature**2)
    return torch.stack(rows)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_tail_term_survives_a_student_confident_on_the_top_k(projection, temperature):
    """A student with ~1e-9 of its mass outside the cached top-k: 1 - sum q over the top-k is pure fp32
    noise there, which lost the teacher's tail term (value and gradient). Both the reference and the fused
    path must match a float64 evaluation."""
    from sakd.losses.fused import FusedCachedForwardKL
    from sakd.losses.rows import make_cached_distill_row_loss
    from sakd.losses.sparse import SparseTeacherSettings, sparse_teacher_divergence

    g = torch.Generator().manual_seed(3)
    rows, k, teacher_vocab = 9, 8, 60 if projection else VOCAB
    to_student = _mapping(teacher_vocab).teacher_to_student if projection else None
    kwargs = {"teacher_to_student": to_student} if projection else {"student_vocab": VOCAB}
    ids = torch.stack([torch.randperm(teacher_vocab, generator=g)[:k] for _ in range(rows)])
    probs = torch.rand(rows, k, generator=g).sort(dim=-1, descending=True).values
    probs = probs / probs.sum(-1, keepdim=True) * 0.9
    tail = 1.0 - probs.sum(-1)
    logits = torch.randn(rows, STUDENT_WIDTH, generator=g)
    columns = ids if to_student is None else to_student[ids]
    logits.scatter_add_(1, columns.clamp_min(0), torch.where(columns >= 0, 20.0 * temperature, 0.0))
    kd_mask, kd_weight = torch.ones(rows, dtype=torch.bool), torch.rand(rows, generator=g) + 0.5
    labels = torch.full((rows,), -100)

    student = logits.double().requires_grad_()
    expected_rows = _brute_force_bucket_kl(
        student, ids, probs, tail, temperature, teacher_vocab, VOCAB, to_student
    )
    expected = (kd_weight.double() * expected_rows).sum()
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert (expected_grad[:, :VOCAB].abs() > 1e-3).any()  # the tail term's pull on the columns outside

    settings = SparseTeacherSettings(teacher_vocab, **kwargs)
    kd = functools.partial(sparse_teacher_divergence, settings=settings)
    reference = make_cached_distill_row_loss(functools.partial(kd, temperature=temperature))
    student = logits.clone().requires_grad_()
    ref_kd = reference(student, labels, ids, probs, tail, kd_mask, kd_weight)["kd"]
    (ref_grad,) = torch.autograd.grad(ref_kd, student)
    fused = FusedCachedForwardKL(reference, temperature, settings)
    parts, fused_grad = fused.with_grad(
        logits.clone(), {"lm": 0.0, "kd": 1.0}, labels, ids, probs, tail, kd_mask, kd_weight
    )
    for value, grad in ((ref_kd, ref_grad), (parts["kd"], fused_grad)):
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("temperature,beta", [(1.0, None), (2.0, None), (1.0, 0.5)])
def test_chunk_likelihood_part_keeps_the_closed_form_path(temperature, beta, sampled):
    """The chunk-likelihood part folded into the fused loss's cross-entropy weights: the same parts and
    gradients as the same wrapper over the autograd row loss, and the wrapper does keep `with_grad`.
    `sampled`: some rows have a next token but no LM label (the student sampled it), so the term reaches
    rows the LM loss does not."""
    from sakd.losses.chunk_likelihood import WithChunkLikelihood

    mapping = _mapping(60)
    params, row_inputs, t_weight, t_bias = _inputs(3, TEACHER_WIDTH)
    kd = functools.partial(projected_divergence, mapping=mapping, temperature=temperature)
    if beta is not None:
        kd = functools.partial(kd, divergence="jsd", beta=beta)
    reference = make_distill_row_loss(kd, t_weight, t_bias)
    fused = FusedForwardKL(
        reference, projected_target(mapping, STUDENT_WIDTH), t_weight, t_bias, temperature, beta
    )
    g = torch.Generator().manual_seed(5)
    coefficients = torch.randn(ROWS, generator=g)
    next_tokens = row_inputs[0]
    if sampled:
        next_tokens = torch.where(next_tokens < 0, torch.randint(0, VOCAB, (ROWS,), generator=g), next_tokens)
        row_inputs[0] = torch.where(torch.rand(ROWS, generator=g) < 0.4, -100, row_inputs[0])
        assert ((row_inputs[0] < 0) & (next_tokens >= 0)).sum() > 5
    wrapped, plain = WithChunkLikelihood(fused), WithChunkLikelihood(reference)
    assert hasattr(wrapped, "with_grad") and not hasattr(plain, "with_grad")
    weights = {"lm": 0.8, "kd": 1.1, "alm": 0.6}
    inputs = [*row_inputs, coefficients, next_tokens]
    total, parts, grads = _run(wrapped, params, inputs, weights, 9)
    ref_total, ref_parts, ref_grads = _run(plain, params, inputs, weights, 9)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    assert parts.keys() == ref_parts.keys() == {"lm", "kd", "alm"}
    for k in parts:
        torch.testing.assert_close(parts[k], ref_parts[k], rtol=1e-5, atol=1e-5)
    hidden, weight, bias = params
    logsm = torch.log_softmax((hidden @ weight.T + bias).detach(), dim=-1)
    ce = -logsm.gather(1, next_tokens.clamp_min(0)[:, None]).squeeze(1)
    labelled = row_inputs[0] >= 0
    torch.testing.assert_close(parts["lm"], ce[labelled].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        parts["alm"], (coefficients * ce)[next_tokens >= 0].sum(), rtol=1e-5, atol=1e-5
    )
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
