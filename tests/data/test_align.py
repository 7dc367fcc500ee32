import itertools
import time
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizer_kinds import KINDS

from sakd.data.align import alignment_groups
from sakd.data.tokenize import require_offsets, tokenize_documents, utf8_prefix_bytes
from sakd.errors import UserError

TOKENIZERS = list(KINDS)
PAIRS = list(itertools.permutations(TOKENIZERS, 2))


def group_char_ends(ends: np.ndarray, group_ends: np.ndarray) -> np.ndarray:
    """The character offset at which each group ends."""
    return ends[group_ends - 1]


def test_slow_tokenizer_is_refused():
    with pytest.raises(UserError, match="the teacher tokenizer cannot give character offsets"):
        require_offsets(SimpleNamespace(is_fast=False), "teacher")


def test_utf8_prefix_bytes():
    text = "aé日🙂"
    assert utf8_prefix_bytes(text).tolist() == [0, 1, 3, 6, 10]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenized_docs_cover_every_byte(tokenizers_by_name, documents, name):
    tokenizer = tokenizers_by_name[name]
    tokenized = tokenize_documents(tokenizer, documents, batch_size=7)
    assert len(tokenized) == len(documents)
    for text, doc in zip(documents, tokenized, strict=True):
        assert doc.ids.dtype == doc.ends.dtype == doc.nbytes.dtype == np.int64
        assert len(doc.ids) == len(doc.ends) == len(doc.nbytes)
        assert doc.nbytes.sum() == len(text.encode("utf-8"))
        assert np.all(np.diff(doc.ends) >= 0)
        assert np.all(doc.nbytes >= 0)
        if tokenizer.eos_token_id is None:
            assert doc.ends[-1] == len(text)
        else:
            assert doc.ids[-1] == tokenizer.eos_token_id
            assert doc.ends[-1] == doc.ends[-2] == len(text)
            assert doc.nbytes[-1] == 0


def test_add_eos_false_appends_nothing(byte_level_tokenizer):
    (with_eos,) = tokenize_documents(byte_level_tokenizer, ["hello world"])
    (without_eos,) = tokenize_documents(byte_level_tokenizer, ["hello world"], add_eos=False)
    assert with_eos.ids[:-1].tolist() == without_eos.ids.tolist()


def assert_valid_groups(text, teacher_doc, student_doc, teacher_group_ends, student_group_ends):
    assert len(teacher_group_ends) == len(student_group_ends) > 0
    assert teacher_group_ends[-1] == len(teacher_doc) and student_group_ends[-1] == len(student_doc)
    assert np.all(np.diff(teacher_group_ends, prepend=0) >= 1)
    assert np.all(np.diff(student_group_ends, prepend=0) >= 1)
    teacher_chars = group_char_ends(teacher_doc.ends, teacher_group_ends)
    student_chars = group_char_ends(student_doc.ends, student_group_ends)
    assert teacher_chars.tolist() == student_chars.tolist()
    starts = np.concatenate([[0], teacher_chars[:-1]])
    assert "".join(text[a:b] for a, b in zip(starts, teacher_chars, strict=True)) == text


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_groups_cover_the_same_text_on_both_sides(tokenizers_by_name, documents, teacher, student):
    teacher_docs = tokenize_documents(tokenizers_by_name[teacher], documents)
    student_docs = tokenize_documents(tokenizers_by_name[student], documents)
    both_have_eos = (
        tokenizers_by_name[teacher].eos_token_id is not None
        and tokenizers_by_name[student].eos_token_id is not None
    )
    for text, teacher_doc, student_doc in zip(documents, teacher_docs, student_docs, strict=True):
        teacher_group_ends, student_group_ends = alignment_groups(teacher_doc.ends, student_doc.ends)
        assert_valid_groups(text, teacher_doc, student_doc, teacher_group_ends, student_group_ends)
        if np.array_equal(teacher_doc.ends, student_doc.ends):  # the same segmentation: a group per token
            assert teacher_group_ends.tolist() == list(range(1, len(teacher_doc) + 1))
            continue
        for doc, group_ends in ((teacher_doc, teacher_group_ends), (student_doc, student_group_ends)):
            # a group never starts with a later piece of a character that an earlier token began (the first
            # token may be zero-width: trimmed offsets report a leading space at (0, 0))
            later_group_starts = group_ends[:-2] if both_have_eos else group_ends[:-1]
            assert np.all(doc.nbytes[later_group_starts] > 0)
        if both_have_eos:
            assert teacher_group_ends[-2] == len(teacher_doc) - 1
            assert student_group_ends[-2] == len(student_doc) - 1


def test_non_ascii_text_aligns_eos_to_eos(byte_level_tokenizer, metaspace_tokenizer, non_ascii_text):
    (teacher_doc,) = tokenize_documents(byte_level_tokenizer, [non_ascii_text])
    (student_doc,) = tokenize_documents(metaspace_tokenizer, [non_ascii_text])
    # the byte-level tokenizer splits multi-byte characters into pieces that share an end offset
    assert np.any(np.diff(teacher_doc.ends[:-1]) == 0)
    teacher_group_ends, student_group_ends = alignment_groups(teacher_doc.ends, student_doc.ends)
    assert_valid_groups(non_ascii_text, teacher_doc, student_doc, teacher_group_ends, student_group_ends)
    assert teacher_group_ends[-2:].tolist() == [len(teacher_doc) - 1, len(teacher_doc)]
    assert student_group_ends[-2:].tolist() == [len(student_doc) - 1, len(student_doc)]


def test_identical_tokenizations_give_one_group_per_token(byte_level_tokenizer, documents):
    for doc in tokenize_documents(byte_level_tokenizer, documents):
        teacher_group_ends, student_group_ends = alignment_groups(doc.ends, doc.ends.copy())
        assert teacher_group_ends.tolist() == student_group_ends.tolist() == list(range(1, len(doc) + 1))


@pytest.mark.parametrize(
    ("teacher_ends", "student_ends", "expected"),
    [
        ([3, 5, 5, 9], [3, 5, 9], ([1, 3, 4], [1, 2, 3])),  # two pieces of one character end at 5
        ([3, 5, 9, 9], [2, 5, 9, 9], ([2, 3, 4], [2, 3, 4])),  # EOS on both sides: its own group
        ([3, 5, 9, 9], [2, 5, 9], ([2, 4], [2, 3])),  # EOS on one side only: joins the last group
        ([2, 4], [3, 5], ([2], [2])),  # no common boundary at all: one group
        (
            [1, 2, 4, 7],
            [2, 4, 6],
            ([2, 4], [1, 3]),
        ),  # text after the last common boundary joins the last group
        ([0, 2, 4, 4], [1, 2, 4, 4], ([2, 3, 4], [2, 3, 4])),  # a zero-width token at the start
        ([], [1, 2], ([], [])),
    ],
)
def test_hand_made_alignments(teacher_ends, student_ends, expected):
    teacher_group_ends, student_group_ends = alignment_groups(np.array(teacher_ends), np.array(student_ends))
    assert teacher_group_ends.dtype == student_group_ends.dtype == np.int64
    assert (teacher_group_ends.tolist(), student_group_ends.tolist()) == expected


def _random_ends(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    teacher_ends = np.cumsum(rng.integers(0, 5, size=n))
    student_ends = np.minimum(np.cumsum(rng.integers(0, 4, size=n * 6 // 5)), teacher_ends[-1])
    student_ends[-1] = teacher_ends[-1]
    return teacher_ends, student_ends


def _best_time(teacher_ends: np.ndarray, student_ends: np.ndarray) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        alignment_groups(teacher_ends, student_ends)
        times.append(time.perf_counter() - start)
    return min(times)


def test_alignment_time_grows_linearly_with_the_tokens():
    """A million tokens align correctly, and ten times the tokens take far less than the hundred times a
    quadratic alignment would (a ratio measured in one run, so a busy machine does not fail it)."""
    big = _random_ends(1_000_000, 0)
    teacher_group_ends, student_group_ends = alignment_groups(*big)
    assert np.array_equal(big[0][teacher_group_ends - 1], big[1][student_group_ends - 1])
    assert _best_time(*big) < 40 * _best_time(*_random_ends(100_000, 1))
