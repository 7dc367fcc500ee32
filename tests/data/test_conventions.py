"""Each model gets the special tokens its own tokenizer adds, and alignment follows the tokens' true text."""

from __future__ import annotations

import itertools
import unicodedata

import numpy as np
import pytest
from tokenizer_kinds import KINDS, token_bytes, tokenizer_of

from sakd.data.align import alignment_groups
from sakd.data.packing import IGNORE_INDEX, collate_windows, pack_windows
from sakd.data.tokenize import InputFormat, input_format, special_prefix, tokenize_documents

EXPECTED_PREFIX = {
    "byte_level": [],
    "byte_level_trimmed": [],
    "metaspace_bpe_bos": ["<s>"],
    "unigram": [],
    "wordpiece": ["[CLS]"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_is_what_the_tokenizer_itself_adds(kind):
    tokenizer = tokenizer_of(kind)
    assert tokenizer.convert_ids_to_tokens(list(special_prefix(tokenizer))) == EXPECTED_PREFIX[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_each_window_starts_as_the_tokenizer_would_start_it(kind, documents):
    """The model reads its prefix, then exactly the tokens its tokenizer gives the text; labels, bytes and
    groups of the text tokens are those of an unprefixed batch, moved right by the prefix."""
    tokenizer = tokenizer_of(kind)
    fmt = input_format(tokenizer)
    windows = pack_windows(tokenize_documents(tokenizer, documents[:6]), None, 64)
    with_prefix = collate_windows(windows, fmt, None)
    plain = collate_windows(windows, InputFormat(fmt.pad_id), None)
    p = len(fmt.prefix)
    own = tokenizer(documents[0], add_special_tokens=True)["input_ids"]
    assert with_prefix.student.input_ids[0, : min(64 + p, len(own))].tolist() == own[: 64 + p][: 64 + p]
    assert with_prefix.student.input_ids[:, :p].tolist() == [list(fmt.prefix)] * len(windows)
    assert (with_prefix.student.labels[:, :p] == IGNORE_INDEX).all()
    assert (with_prefix.student.group[:, :p] == -1).all()
    for key in ("input_ids", "labels", "target_bytes", "group", "attention_mask"):
        prefixed, unprefixed = getattr(with_prefix.student, key), getattr(plain.student, key)
        assert prefixed[:, p:].tolist() == unprefixed.tolist(), key


def test_a_prefix_on_one_side_moves_only_that_sides_aligned_positions(documents):
    teacher, student = tokenizer_of("metaspace_bpe_bos"), tokenizer_of("byte_level")
    windows = pack_windows(
        tokenize_documents(student, documents[:8]), tokenize_documents(teacher, documents[:8]), 48
    )
    with_prefix = collate_windows(windows, input_format(student), input_format(teacher))
    plain = collate_windows(windows, InputFormat(student.pad_token_id), InputFormat(teacher.pad_token_id))
    mask = plain.alignment.mask
    assert with_prefix.alignment.mask.tolist() == mask.tolist()
    assert with_prefix.alignment.student_pos.tolist() == plain.alignment.student_pos.tolist()
    assert (with_prefix.alignment.teacher_pos[mask] == plain.alignment.teacher_pos[mask] + 1).all()
    rows = np.arange(len(windows))[:, None].repeat(mask.shape[1], 1)[mask.numpy()]
    moved = with_prefix.teacher.input_ids[rows, with_prefix.alignment.teacher_pos[mask]]
    assert moved.tolist() == plain.teacher.input_ids[rows, plain.alignment.teacher_pos[mask]].tolist()


def test_trimmed_offsets_give_the_same_token_ends_as_untrimmed(documents):
    """A RoBERTa-style post-processor trims whitespace out of offsets (a newline + indent token then ends
    before its spaces); the true extents do not depend on it."""
    tokenizer = tokenizer_of("byte_level_trimmed")
    trimmed = tokenize_documents(tokenizer, documents)
    untrimmed = tokenize_documents(tokenizer_of("byte_level"), documents)
    # the fixture does exercise trimming: the tokenizer's own offsets of some newline + indent token end early
    own = tokenizer(documents, add_special_tokens=False, return_offsets_mapping=True)
    steps_back = [
        (start, end)
        for ids, offsets in zip(own["input_ids"], own["offset_mapping"], strict=True)
        for i, (start, end) in zip(ids, offsets, strict=True)
        if token_bytes(tokenizer, i).startswith(b"\n ") and end - start < len(token_bytes(tokenizer, i))
    ]
    assert steps_back
    for a, b in zip(trimmed, untrimmed, strict=True):
        assert a.ends.tolist() == b.ends.tolist() and a.nbytes.tolist() == b.nbytes.tolist()


def _canonical(text: bytes, lossy: bool) -> bytes | str:
    """Text as both sides can be compared: its bytes, or with WordPiece (which drops whitespace, accents and
    case) on a side, only the letters left after the same normalisation."""
    if not lossy:
        return text
    decoded = text.decode("utf-8")
    decoded = "".join(c for c in unicodedata.normalize("NFD", decoded) if not unicodedata.combining(c))
    return "".join(decoded.lower().split())


def _group_texts(tokenizer, doc, group_ends, text) -> list[bytes | None]:
    """Each group's bytes decoded from its tokens (None where a token is <unk>: its text is unknown). The
    space a metaspace tokenizer prepends to a document is not part of the text."""
    unk = tokenizer.unk_token_id
    texts, start = [], 0
    for end in group_ends:
        ids = doc.ids[start:end]
        texts.append(
            None if unk is not None and unk in ids else b"".join(token_bytes(tokenizer, i) for i in ids)
        )
        start = end
    if texts and texts[0] is not None and texts[0].startswith(b" ") and not text.startswith(" "):
        texts[0] = texts[0][1:]
    return texts


@pytest.mark.parametrize(("teacher", "student"), list(itertools.permutations(KINDS, 2)))
def test_aligned_groups_hold_the_same_text_decoded_from_token_bytes(teacher, student, documents):
    """For every aligned group, the teacher's tokens and the student's tokens stand for the same text, read
    from each token's vocabulary entry rather than from offsets."""
    t_tok, s_tok = tokenizer_of(teacher), tokenizer_of(student)
    lossy = "wordpiece" in (teacher, student)
    compared = 0
    for text, t_doc, s_doc in zip(
        documents, tokenize_documents(t_tok, documents), tokenize_documents(s_tok, documents), strict=True
    ):
        t_ends, s_ends = alignment_groups(t_doc.ends, s_doc.ends)
        t_texts = _group_texts(t_tok, t_doc, t_ends, text)
        s_texts = _group_texts(s_tok, s_doc, s_ends, text)
        for g, (a, b) in enumerate(zip(t_texts, s_texts, strict=True)):
            if a is None or b is None:
                continue
            assert _canonical(a, lossy) == _canonical(b, lossy), (g, a, b)
            compared += 1
    assert compared > 200
