"""From text sources to packed, aligned windows for one or two tokenizers."""

from __future__ import annotations

from collections.abc import Sequence

from sakd.data.packing import Window, pack_windows
from sakd.data.sources import load_sources
from sakd.data.tokenize import TokenizedDoc, require_offsets, tokenize_documents


def tokenized_sources(
    sources: Sequence, student_tokenizer, teacher_tokenizer=None
) -> tuple[list[str], list[TokenizedDoc], list[TokenizedDoc] | None]:
    """The documents of `sources` and their tokenizations with offsets by each tokenizer (None for a missing
    teacher tokenizer)."""
    require_offsets(student_tokenizer, "student")
    if teacher_tokenizer is not None:
        require_offsets(teacher_tokenizer, "teacher")
    docs = load_sources(sources)
    student_docs = tokenize_documents(student_tokenizer, docs)
    teacher_docs = tokenize_documents(teacher_tokenizer, docs) if teacher_tokenizer is not None else None
    return docs, student_docs, teacher_docs


def build_windows(
    sources: Sequence,
    student_tokenizer,
    teacher_tokenizer=None,
    max_length: int = 256,
    max_windows: int | None = None,
) -> list[Window]:
    """Documents from `sources`, tokenized by both tokenizers with offsets, packed into windows covering the
    same characters on both sides (student side only without a teacher tokenizer)."""
    _, student_docs, teacher_docs = tokenized_sources(sources, student_tokenizer, teacher_tokenizer)
    windows = pack_windows(student_docs, teacher_docs, max_length)
    return windows[:max_windows] if max_windows else windows
