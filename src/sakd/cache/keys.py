"""Character keys of teacher positions: what lets one teacher cache serve students with other tokenizers.

A teacher position's next-token distribution predicts the text that starts where its token ends, so it is keyed
by (document index, character offset, pieces left), int64 (3,):
- a text token of document d ending at character c: (d, c, r), where r counts the tokens after it that end at
  the same character (the later byte-level pieces of one character); r = 0 at every character boundary;
- the EOS appended to document d: (d, len(d) + 1, 0), as if EOS were one more character.
Any student's alignment groups end where the teacher's tokens end at a character boundary (r = 0), so a
student's aligned position finds the teacher distribution for the same character offset whatever its
tokenizer. Keys with r > 0 serve only a student that shares the teacher's tokenizer (every token its own group).
Document indices count the documents of `load_sources(data.train)`, so the data sources must not change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sakd.data.corpus import tokenized_sources
from sakd.data.packing import Window, pack_windows
from sakd.data.tokenize import TokenizedDoc
from sakd.errors import UserError


@dataclass
class KeyedWindows:
    """Packed windows with the key of every teacher token.

    windows: as `build_windows` gives them; teacher_keys (N_t, 3) int64: the key of each token of the teacher
    stream (all kept documents, concatenated); teacher_starts (W,) int64: stream index of each window's first
    teacher token; num_documents: documents read from the sources; data_fingerprint: `documents_fingerprint`
    of them.
    """

    windows: list[Window]
    teacher_keys: np.ndarray
    teacher_starts: np.ndarray
    num_documents: int
    data_fingerprint: str

    def window_keys(self, window: int) -> np.ndarray:
        """(Lt, 3) int64: the keys of one window's teacher tokens."""
        start = self.teacher_starts[window]
        return self.teacher_keys[start : start + len(self.windows[window].teacher_ids)]


def documents_fingerprint(docs: Sequence[str]) -> str:
    """sha256 over the documents' text, in order: a data file rewritten in place under the same path changes
    it, while the sources' paths alone would not."""
    digest = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))  # the length keeps document boundaries in the hash
        digest.update(data)
    return digest.hexdigest()


def document_keys(doc: TokenizedDoc, length: int, index: int, has_eos: bool) -> np.ndarray:
    """(n, 3) int64 keys of one document's tokens; `length` is its length in characters and `has_eos` says
    whether its last token is the appended EOS."""
    n = len(doc)
    text = n - 1 if has_eos else n
    ends = doc.ends[:text]
    unit_last = np.flatnonzero(np.append(ends[1:] != ends[:-1], True))  # (U,) last token of each run
    positions = np.arange(text)
    keys = np.empty((n, 3), dtype=np.int64)
    keys[:, 0] = index
    keys[:text, 1] = ends
    keys[:text, 2] = unit_last[np.searchsorted(unit_last, positions)] - positions
    if has_eos:
        keys[-1, 1:] = (length + 1, 0)
    return keys


def keyed_windows(sources: Sequence, student_tokenizer, teacher_tokenizer, max_length: int) -> KeyedWindows:
    """The windows `build_windows(sources, student_tokenizer, teacher_tokenizer, max_length)` gives, with the
    key of every teacher token."""
    docs, student_docs, teacher_docs = tokenized_sources(sources, student_tokenizer, teacher_tokenizer)
    if any(not isinstance(doc, str) for doc in docs):  # keys count characters of plain documents only
        raise UserError("a teacher cache needs plain text data: drop teacher.cache for chat data")
    windows = pack_windows(student_docs, teacher_docs, max_length)

    has_eos = teacher_tokenizer.eos_token_id is not None
    # the documents packing keeps, in stream order: the windows' `teacher_start`s index their keys
    kept = [i for i, (s, t) in enumerate(zip(student_docs, teacher_docs, strict=True)) if len(s) and len(t)]
    keys = [document_keys(teacher_docs[i], len(docs[i]), i, has_eos) for i in kept]
    teacher_keys = np.concatenate(keys) if keys else np.zeros((0, 3), dtype=np.int64)
    teacher_starts = np.array([w.teacher_start for w in windows], dtype=np.int64)
    return KeyedWindows(windows, teacher_keys, teacher_starts, len(docs), documents_fingerprint(docs))


def same_windows(a: list[Window], b: list[Window]) -> bool:
    """Whether two window lists hold the same tokens on both sides."""
    return len(a) == len(b) and all(
        np.array_equal(x.student_ids, y.student_ids) and np.array_equal(x.teacher_ids, y.teacher_ids)
        for x, y in zip(a, b, strict=True)
    )


def combine_keys(*key_sets: np.ndarray) -> list[np.ndarray]:
    """One int64 per key, ordered like the keys (document, character, then pieces left DEScending, which is
    stream order), for every given (n, 3) set with the same radices. Raises ValueError on overflow."""
    stacked = [k for k in key_sets if len(k)]
    char_radix = int(max((k[:, 1].max() for k in stacked), default=0)) + 1
    piece_radix = int(max((k[:, 2].max() for k in stacked), default=0)) + 1
    docs = int(max((k[:, 0].max() for k in stacked), default=0)) + 1
    if docs * char_radix * piece_radix >= 2**62:
        raise ValueError("too many documents x characters to key a teacher cache")
    return [(k[:, 0] * char_radix + k[:, 1]) * piece_radix + (piece_radix - 1 - k[:, 2]) for k in key_sets]


def lookup_rows(cache_keys: np.ndarray, query_keys: np.ndarray) -> np.ndarray:
    """(Q,) int64: for each query key, the first cache row with that key, or -1."""
    cached, query = combine_keys(cache_keys, query_keys)
    if len(cached) and np.all(cached[1:] >= cached[:-1]):  # a cache is written in stream order
        order = None
        ordered = cached
    else:
        order = np.argsort(cached, kind="stable")
        ordered = cached[order]
    if len(ordered) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ordered, query), len(ordered) - 1)
    found = ordered[pos] == query
    rows = pos if order is None else order[pos]
    return np.where(found, rows, -1).astype(np.int64)
