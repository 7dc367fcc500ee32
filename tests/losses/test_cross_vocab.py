import dataclasses
import json
import pathlib
import sysconfig

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sakd.errors import UserError
from sakd.losses.cross_vocab import (
    CROSS_VOCAB_LOSSES,
    VocabMapping,
    build_vocab_mapping,
    hybrid_loss,
    projected_divergence,
    projected_teacher_probs,
    uld_loss,
)
from sakd.losses.divergence import divergence

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return [line for name in ["textwrap.py", "shlex.py"] for line in (STDLIB / name).read_text().splitlines()]


def _byte_level_bpe(
    lines: list[str], vocab_size: int, full_alphabet: bool = False
) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_alphabet else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet
    )
    tokenizer.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _metaspace_unigram(lines: list[str], vocab_size: int, byte_fallback: bool) -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: metaspace unigram, optionally with <0xNN> byte-fallback tokens."""
    trained = Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["</s>", "<unk>"], unk_token="<unk>"
    )
    trained.train_from_iterator(lines, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = [tuple(piece) for piece in model["vocab"]]
    if byte_fallback:
        vocab += [(f"<0x{byte:02X}>", -100.0) for byte in range(256)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=model["unk_id"], byte_fallback=byte_fallback))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def teacher_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    return _byte_level_bpe(lines, 400)


@pytest.fixture(scope="module")
def student_tokenizer(lines: list[str]) -> PreTrainedTokenizerFast:
    return _metaspace_unigram(lines, 300, byte_fallback=True)


@pytest.fixture(scope="module")
def mapping(teacher_tokenizer, student_tokenizer) -> VocabMapping:
    return build_vocab_mapping(teacher_tokenizer, student_tokenizer)


def _student_text(tokenizer: PreTrainedTokenizerFast, student_id: int) -> str | None:
    token = tokenizer.convert_ids_to_tokens(student_id)
    return None if token.startswith("<0x") else token.replace("▁", " ")


def _logits(rows: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * 2


def test_mapping_covers_and_maps_to_prefixes(mapping, teacher_tokenizer, student_tokenizer) -> None:
    assert mapping.teacher_vocab_size == len(teacher_tokenizer) == mapping.teacher_to_student.shape[0]
    assert mapping.student_vocab_size == len(student_tokenizer)
    assert mapping.coverage > 0.9
    assert mapping.coverage == pytest.approx((mapping.teacher_to_student >= 0).float().mean().item())
    checked = 0
    for teacher_id, student_id in enumerate(mapping.teacher_to_student.tolist()):
        teacher_text = teacher_tokenizer.decode([teacher_id])
        if student_id < 0 or "\ufffd" in teacher_text or teacher_id == teacher_tokenizer.eos_token_id:
            continue
        student_text = _student_text(student_tokenizer, student_id)
        if student_text is not None:
            assert teacher_text.startswith(student_text), (teacher_text, student_text)
            checked += 1
    assert checked > 0.8 * len(teacher_tokenizer)
    # Special tokens: EOS pairs with EOS (both end the document), nothing maps onto the student's unk.
    assert mapping.teacher_to_student[teacher_tokenizer.eos_token_id] == student_tokenizer.eos_token_id
    assert student_tokenizer.unk_token_id not in mapping.teacher_to_student.tolist()


def test_word_tokens_map_to_their_first_student_token(mapping, teacher_tokenizer, student_tokenizer) -> None:
    teacher_ids = teacher_tokenizer(" self", add_special_tokens=False)["input_ids"]
    assert len(teacher_ids) == 1
    first_student = student_tokenizer(" self", add_special_tokens=False)["input_ids"][0]
    assert mapping.teacher_to_student[teacher_ids[0]] == first_student


def test_byte_fragments(lines) -> None:
    """Byte-level tokens holding part of a UTF-8 character decode to U+FFFD; they map by their bytes."""
    teacher = _byte_level_bpe(lines, 400, full_alphabet=True)
    char_to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    fragments = {
        i: bytes(char_to_byte[char] for char in teacher.convert_ids_to_tokens(i))
        for i in range(len(teacher))
        if "\ufffd" in teacher.decode([i]) and i != teacher.eos_token_id
    }
    assert len(fragments) >= 64
    # A student with byte fallback receives each fragment at its first byte's <0xNN> token.
    with_fallback = _metaspace_unigram(lines, 300, byte_fallback=True)
    mapped = build_vocab_mapping(teacher, with_fallback).teacher_to_student
    for i, data in fragments.items():
        assert with_fallback.convert_ids_to_tokens(int(mapped[i])) == f"<0x{data[0]:02X}>"
    # A student without byte tokens cannot represent a fragment.
    without = build_vocab_mapping(
        teacher, _metaspace_unigram(lines, 300, byte_fallback=False)
    ).teacher_to_student
    assert (without[list(fragments)] == -1).all()
    # A byte-level student gets its token for the fragment's leading bytes.
    byte_student = _byte_level_bpe(lines[::2], 330, full_alphabet=True)
    to_byte_student = build_vocab_mapping(teacher, byte_student).teacher_to_student
    for i, data in fragments.items():
        student_token = byte_student.convert_ids_to_tokens(int(to_byte_student[i]))
        assert data.startswith(bytes(char_to_byte[char] for char in student_token))


def test_shared_pairs_are_one_to_one_and_identical(mapping, teacher_tokenizer, student_tokenizer) -> None:
    teacher_ids, student_ids = mapping.shared_teacher_ids.tolist(), mapping.shared_student_ids.tolist()
    assert len(teacher_ids) == len(set(teacher_ids)) == len(set(student_ids)) > 50
    for teacher_id, student_id in zip(teacher_ids, student_ids, strict=True):
        if teacher_id != teacher_tokenizer.eos_token_id:
            assert teacher_tokenizer.decode([teacher_id]) == _student_text(student_tokenizer, student_id)


def test_save_load_roundtrip(mapping, tmp_path) -> None:
    mapping.save(tmp_path / "mapping.pt")
    loaded = VocabMapping.load(tmp_path / "mapping.pt")
    assert torch.equal(loaded.teacher_to_student, mapping.teacher_to_student)
    assert torch.equal(loaded.shared_student_ids, mapping.shared_student_ids)
    assert (loaded.teacher_vocab_size, loaded.student_vocab_size, loaded.coverage) == (
        mapping.teacher_vocab_size,
        mapping.student_vocab_size,
        mapping.coverage,
    )


def test_projection_sums_to_one_and_conserves_mass(mapping) -> None:
    # Model widths padded beyond the tokenizers (real models pad, e.g. 151,936 or 152,064 logits for smaller
    # tokenizers): the padding columns must not take teacher mass.
    teacher_logits = _logits(5, mapping.teacher_vocab_size + 37, 0)
    projected = projected_teacher_probs(teacher_logits, mapping, 2.0, mapping.student_vocab_size + 20)
    assert projected.shape == (5, mapping.student_vocab_size + 20)
    torch.testing.assert_close(projected.sum(-1), torch.ones(5))
    assert (projected[:, mapping.student_vocab_size :] == 0).all()
    probs = torch.softmax(teacher_logits[:, : mapping.teacher_vocab_size] / 2.0, -1)
    target = int(mapping.teacher_to_student[mapping.shared_teacher_ids[3]])
    sources = mapping.teacher_to_student == target
    mapped_mass = probs[:, mapping.teacher_to_student >= 0].sum(-1)
    torch.testing.assert_close(projected[:, target], probs[:, sources].sum(-1) / mapped_mass)


def test_padded_widths_slice_teacher_and_keep_student(mapping) -> None:
    student_logits = _logits(4, mapping.student_vocab_size + 20, 1)
    teacher_logits = _logits(4, mapping.teacher_vocab_size, 2)
    padded_teacher = torch.cat([teacher_logits, torch.full((4, 37), 50.0)], dim=-1)
    for name, loss in CROSS_VOCAB_LOSSES.items():
        rows = loss(student_logits, padded_teacher, mapping, 2.0)
        assert rows.shape == (4,) and rows.dtype == torch.float32 and torch.isfinite(rows).all(), name
        # Teacher padding columns are not tokens: huge logits there change nothing.
        torch.testing.assert_close(rows, loss(student_logits, teacher_logits, mapping, 2.0))
        # Student padding columns are real outputs: mass moved there is penalised.
        shifted = student_logits.clone()
        shifted[:, mapping.student_vocab_size :] += 10.0
        assert (loss(shifted, teacher_logits, mapping, 2.0) > rows).all(), name
    with pytest.raises(UserError, match="teacher model and tokenizer"):
        uld_loss(student_logits, teacher_logits[:, :-1], mapping, 1.0)
    with pytest.raises(UserError, match="student model and tokenizer"):
        uld_loss(student_logits[:, : mapping.student_vocab_size - 1], teacher_logits, mapping, 1.0)


def test_identical_tokenizers_projection_equals_plain_kl(teacher_tokenizer) -> None:
    identity = build_vocab_mapping(teacher_tokenizer, teacher_tokenizer)
    assert torch.equal(identity.teacher_to_student, torch.arange(len(teacher_tokenizer)))
    student_logits, teacher_logits = (
        _logits(6, len(teacher_tokenizer), 3),
        _logits(6, len(teacher_tokenizer), 4),
    )
    for name in ["forward_kl", "jsd", "tvd"]:
        projected = projected_divergence(student_logits, teacher_logits, identity, 2.0, divergence=name)
        plain = divergence(name, student_logits, torch.log_softmax(teacher_logits / 2.0, -1), 2.0)
        torch.testing.assert_close(projected, plain, rtol=1e-5, atol=1e-6)
    # With the same distribution on both sides every loss is zero.
    for loss in CROSS_VOCAB_LOSSES.values():
        torch.testing.assert_close(loss(teacher_logits, teacher_logits, identity, 2.0), torch.zeros(6))


def test_projection_refuses_reverse_kl(mapping) -> None:
    student_logits, teacher_logits = (
        _logits(2, mapping.student_vocab_size, 5),
        _logits(2, mapping.teacher_vocab_size, 6),
    )
    with pytest.raises(UserError, match="reverse KL"):
        projected_divergence(student_logits, teacher_logits, mapping, 1.0, divergence="reverse_kl")


def test_projection_and_hybrid_refuse_divergences_without_meaning_there(mapping) -> None:
    """AKL's reverse KL part is infinite against a projected teacher; AKL and TAID on the hybrid's restricted
    shared vectors are undefined. TAID against the projected teacher is finite."""
    student_logits, teacher_logits = (
        _logits(2, mapping.student_vocab_size, 5),
        _logits(2, mapping.teacher_vocab_size, 6),
    )
    with pytest.raises(UserError, match="akl against a projected teacher"):
        projected_divergence(student_logits, teacher_logits, mapping, 1.0, divergence="akl")
    for name in ["akl", "taid"]:
        with pytest.raises(UserError, match=f"cannot use {name}"):
            hybrid_loss(student_logits, teacher_logits, mapping, 1.0, divergence=name)
    rows = projected_divergence(student_logits, teacher_logits, mapping, 1.0, divergence="taid", beta=0.5)
    assert torch.isfinite(rows).all() and (rows > 0).all()


def test_teacher_certain_of_an_unmapped_token_gives_zero(mapping) -> None:
    unmapped = 7
    teacher_to_student = mapping.teacher_to_student.clone()
    teacher_to_student[unmapped] = -1
    mapping = dataclasses.replace(mapping, teacher_to_student=teacher_to_student)
    teacher_logits = torch.full((2, mapping.teacher_vocab_size), -1e4)
    teacher_logits[:, unmapped] = 1e4
    student_logits = _logits(2, mapping.student_vocab_size, 7).requires_grad_()
    for name in ["jsd", "taid"]:
        rows = projected_divergence(student_logits, teacher_logits, mapping, 1.0, divergence=name)
        assert torch.equal(rows, torch.zeros(2)), name
        (grad,) = torch.autograd.grad(rows.sum(), student_logits)
        assert torch.equal(grad, torch.zeros_like(grad)), name


def test_uld_zero_for_same_sorted_distribution_and_permutation_invariant(mapping) -> None:
    width = mapping.teacher_vocab_size
    teacher_logits = _logits(3, width, 8)
    permutation = torch.randperm(width, generator=torch.Generator().manual_seed(9))
    # The student holds the teacher's probabilities in another order (and nothing on its extra tokens):
    # nothing to learn for ULD.
    padding = torch.full((3, mapping.student_vocab_size - width), -1e4)
    student_logits = torch.cat([teacher_logits[:, permutation], padding], -1)
    torch.testing.assert_close(uld_loss(student_logits, teacher_logits, mapping, 2.0), torch.zeros(3))
    permutation = torch.randperm(mapping.student_vocab_size, generator=torch.Generator().manual_seed(10))
    other = _logits(3, mapping.student_vocab_size, 10)
    torch.testing.assert_close(
        uld_loss(other[:, permutation], teacher_logits, mapping, 2.0),
        uld_loss(other, teacher_logits, mapping, 2.0),
    )


def test_uld_matches_formula(mapping) -> None:
    student_logits, teacher_logits = (
        _logits(3, mapping.student_vocab_size, 11),
        _logits(3, mapping.teacher_vocab_size, 12),
    )
    q = torch.softmax(student_logits.double(), -1).sort(-1, descending=True).values
    p = torch.softmax(teacher_logits.double(), -1).sort(-1, descending=True).values
    p = torch.nn.functional.pad(p, (0, q.shape[-1] - p.shape[-1]))
    expected = (p - q).abs().sum(-1)
    torch.testing.assert_close(
        uld_loss(student_logits, teacher_logits, mapping, 1.0).double(), expected, rtol=1e-5, atol=1e-6
    )


def test_hybrid_matches_formula(mapping) -> None:
    student_logits, teacher_logits = (
        _logits(3, mapping.student_vocab_size + 4, 13),
        _logits(3, mapping.teacher_vocab_size, 14),
    )
    q = torch.softmax(student_logits.double() / 2.0, -1)
    p = torch.softmax(teacher_logits.double() / 2.0, -1)
    shared_p, shared_q = p[:, mapping.shared_teacher_ids], q[:, mapping.shared_student_ids]
    exact = (shared_p * (shared_p.log() - shared_q.log())).sum(-1) * 4.0
    rest_p = p[:, [i for i in range(p.shape[1]) if i not in set(mapping.shared_teacher_ids.tolist())]]
    rest_q = q[:, [i for i in range(q.shape[1]) if i not in set(mapping.shared_student_ids.tolist())]]
    rest_p, rest_q = rest_p.sort(-1, descending=True).values, rest_q.sort(-1, descending=True).values
    width = max(rest_p.shape[1], rest_q.shape[1])
    rest_p = torch.nn.functional.pad(rest_p, (0, width - rest_p.shape[1]))
    rest_q = torch.nn.functional.pad(rest_q, (0, width - rest_q.shape[1]))
    mass_gap = (shared_q.sum(-1) - shared_p.sum(-1)) * 4.0  # KL of unnormalised measures
    expected = exact + mass_gap + (rest_p - rest_q).abs().sum(-1)
    torch.testing.assert_close(
        hybrid_loss(student_logits, teacher_logits, mapping, 2.0).double(), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("divergence_name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_hybrid_is_a_divergence_at_every_temperature(
    mapping, temperature: float, divergence_name: str
) -> None:
    """Restricted to the shared tokens, a plain KL is negative where the student holds more shared mass than
    the teacher, and T^2 lets that outweigh the unscaled ULD part: the loss must still be >= 0."""
    for seed in range(3):
        teacher_logits = _logits(64, mapping.teacher_vocab_size, 200 + seed) * (1 + seed)
        student_logits = _logits(64, mapping.student_vocab_size + 4, 100 + seed) * (1 + seed)
        # The student copies the teacher on shared tokens, shifted by a per-row amount: from less shared mass
        # than the teacher to much more, where a restricted KL goes negative.
        shift = torch.linspace(-1, 3, 64)[:, None]
        student_logits[:, mapping.shared_student_ids] = teacher_logits[:, mapping.shared_teacher_ids] + shift
        rows = hybrid_loss(student_logits, teacher_logits, mapping, temperature, divergence_name)
        assert rows.min() >= -1e-5 * temperature**2, (seed, rows.min().item())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_hybrid_is_zero_for_equal_distributions(temperature: float) -> None:
    """Two tokenizers whose shared tokens sit at other ids: the same distribution gives 0 at every T."""
    student_ids = torch.tensor([3, 0, 5, 1])  # student twin of teacher tokens 0..3
    mapping = VocabMapping(
        teacher_to_student=torch.cat([student_ids, torch.tensor([2, 4])]),
        shared_teacher_ids=torch.arange(4),
        shared_student_ids=student_ids,
        teacher_vocab_size=6,
        student_vocab_size=6,
        coverage=1.0,
    )
    teacher_logits = _logits(8, 6, 17)
    student_logits = torch.empty_like(teacher_logits)
    student_logits[:, student_ids] = teacher_logits[:, :4]
    student_logits[:, [4, 2]] = teacher_logits[:, 4:]  # the unshared rest, in another order
    rows = hybrid_loss(student_logits, teacher_logits, mapping, temperature)
    torch.testing.assert_close(rows, torch.zeros(8), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["projection", "uld", "hybrid"])
def test_gradients_finite(mapping, name: str) -> None:
    student_logits = _logits(4, mapping.student_vocab_size, 15).bfloat16().requires_grad_()
    teacher_logits = _logits(4, mapping.teacher_vocab_size, 16).bfloat16()
    rows = CROSS_VOCAB_LOSSES[name](student_logits, teacher_logits, mapping, 2.0)
    (grad,) = torch.autograd.grad(rows.sum(), student_logits)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_coverage_without_byte_fallback_reports_unmapped_fragments(lines) -> None:
    teacher = _byte_level_bpe(lines, 400, full_alphabet=True)
    student = _metaspace_unigram(lines, 300, byte_fallback=False)
    mapping = build_vocab_mapping(teacher, student)
    assert 0.5 < mapping.coverage < 1.0
    assert mapping.coverage == pytest.approx((mapping.teacher_to_student >= 0).float().mean().item())


@pytest.mark.parametrize("name", ["projection", "uld", "hybrid"])
def test_nan_teacher_propagates(mapping, name: str) -> None:
    """A NaN teacher row is reported as NaN, never turned into a zero loss."""
    student = torch.randn(3, mapping.student_vocab_size)
    teacher = torch.randn(3, mapping.teacher_vocab_size)
    teacher[1] = float("nan")
    rows = CROSS_VOCAB_LOSSES[name](student, teacher, mapping, 1.0)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
