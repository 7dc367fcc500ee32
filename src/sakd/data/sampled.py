"""Batches of text the student wrote itself, for on-policy distillation.

Each row is a prompt (student tokens of a training window) and the tokens the student sampled after it.
They become text again, and that text is tokenized by both tokenizers and aligned afresh, exactly as the
training data is (`sakd.data.tokenize`, `sakd.data.packing`): across tokenizers the teacher can only judge the
student's text, not its tokens. An EOS inside a row ends a document there, as it does in the packed data. The
batch marks the labels whose tokens hold any character the student sampled (`Batch.sampled`): they are
distilled but carry no LM loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from sakd.data.batch import IGNORE_INDEX, Batch
from sakd.data.packing import Window, collate_windows, pack_windows
from sakd.data.tokenize import InputFormat, TokenizedDoc, input_format, text_tokenizer, tokenized_doc


@dataclass(frozen=True)
class SampledRow:
    """One row: `prompt` (student token ids from the data, without the model's prefix tokens), `sampled`
    (the ids the student sampled after it, ending at its first EOS if it wrote one) and `window` (the index
    of the training window the prompt comes from)."""

    prompt: list[int]
    sampled: list[int]
    window: int


@dataclass
class _Segment:
    """The text between two EOS tokens of a row: `text`, whether an EOS ends it, and the character from which
    the student wrote it (None: it wrote none of it, its EOS included)."""

    text: str
    ends_with_eos: bool
    sampled_from: int | None


class SampledText:
    """Builds the batches of sampled rows for one pair of tokenizers (`teacher` None: one tokenizer)."""

    def __init__(self, student: Any, teacher: Any | None, max_length: int):
        self.tokenizers = (student, teacher)
        self.backends = tuple(text_tokenizer(t) if t is not None else None for t in self.tokenizers)
        self.formats: tuple[InputFormat, InputFormat | None] = (input_format(student), input_format(teacher))
        self.max_length = max_length

    def batch(self, rows: list[SampledRow]) -> Batch | None:
        """The rows' texts as one collated batch with its `sampled` labels; None when a row's text gives no
        window (fewer than 2 tokens on a side)."""
        windows, flags = [], []
        for row in rows:
            made = self.window(row)
            if made is None:
                return None
            windows.append(made[0])
            flags.append(made[1])
        batch = collate_windows(windows, *self.formats)
        sampled = torch.zeros(batch.student.labels.shape, dtype=torch.bool)  # (B, Ls)
        shift = len(self.formats[0].prefix)
        for b, token_flags in enumerate(flags):
            # position i predicts token i + 1: its label is sampled when that token is
            sampled[b, shift : shift + len(token_flags) - 1] = torch.from_numpy(token_flags[1:])
        return replace(batch, sampled=sampled & (batch.student.labels != IGNORE_INDEX))

    def window(self, row: SampledRow) -> tuple[Window, np.ndarray] | None:
        """The row's window (the first `max_length` student tokens of its text, as packing makes them) and
        (Ls,) bool: whether each of its student tokens holds a character the student sampled."""
        segments = self.segments(row)
        docs: list[list[TokenizedDoc]] = [[], []]
        flags = []
        for segment in segments:
            student_doc, teacher_doc = (self._tokenize(segment, side) for side in (0, 1))
            if len(student_doc) == 0 or (teacher_doc is not None and len(teacher_doc) == 0):
                continue  # packing drops a document without tokens on a side
            docs[0].append(student_doc)
            if teacher_doc is not None:
                docs[1].append(teacher_doc)
            flags.append(_sampled_tokens(student_doc, segment.sampled_from))
        teacher_docs = docs[1] if self.tokenizers[1] is not None else None
        windows = pack_windows(docs[0], teacher_docs, self.max_length) if docs[0] else []
        if not windows:
            return None
        window = replace(windows[0], index=row.window)
        return window, np.concatenate(flags)[: len(window.student_ids)]

    def segments(self, row: SampledRow) -> list[_Segment]:
        """The row's tokens split at each EOS, decoded; where the student's part starts in each."""
        student = self.tokenizers[0]
        tokens, first_sampled = [*row.prompt, *row.sampled], len(row.prompt)
        bounds, start = [], 0
        for i, token in enumerate(tokens):
            if token == student.eos_token_id:
                bounds.append((start, i, True))
                start = i + 1
        if start < len(tokens):
            bounds.append((start, len(tokens), False))
        segments = []
        for start, stop, eos in bounds:
            text = student.decode(tokens[start:stop], skip_special_tokens=True)
            sampled_from = None
            if stop > first_sampled or (eos and stop >= first_sampled):  # a sampled token, or a sampled EOS
                prompt_text = student.decode(
                    tokens[start : max(start, first_sampled)], skip_special_tokens=True
                )
                # a prompt that ends inside a character decodes otherwise alone than followed by its rest
                sampled_from = len(os.path.commonprefix([prompt_text, text]))
            segments.append(_Segment(text, eos, sampled_from))
        return segments

    def _tokenize(self, segment: _Segment, side: int) -> TokenizedDoc | None:
        tokenizer, backend = self.tokenizers[side], self.backends[side]
        if tokenizer is None:
            return None
        encoding = backend.encode(segment.text, add_special_tokens=False)
        eos = tokenizer.eos_token_id if segment.ends_with_eos else None
        return tokenized_doc(segment.text, encoding.ids, encoding.offsets, eos)


def _sampled_tokens(doc: TokenizedDoc, sampled_from: int | None) -> np.ndarray:
    """(n,) bool: the document's tokens that hold a character from `sampled_from` on (an EOS: that starts
    there or later)."""
    if sampled_from is None:
        return np.zeros(len(doc), dtype=bool)
    starts = np.concatenate([[0], doc.ends[:-1]])
    return (doc.ends > sampled_from) | (starts >= sampled_from)
