"""From data sources to packed, aligned windows for one or two tokenizers."""

from __future__ import annotations

from collections.abc import Sequence

from sakd.data import chat
from sakd.data.formats import Example
from sakd.data.packing import Window, pack_windows
from sakd.data.sources import load_sources
from sakd.data.tokenize import TokenizedDoc, require_offsets, tokenize_documents


def tokenize_examples(tokenizer, examples: list[Example], role: str) -> list[TokenizedDoc]:
    """Each example tokenized with offsets: text documents in batches as `tokenize_documents` does (EOS
    appended), chat and prompt-completion rows with this model's chat template and loss targets."""
    texts = [example for example in examples if isinstance(example, str)]
    chats = [example for example in examples if not isinstance(example, str)]
    plain = iter(tokenize_documents(tokenizer, texts) if texts else [])
    rendered = iter(chat.tokenize_examples(tokenizer, chats, role) if chats else [])
    return [next(plain) if isinstance(e, str) else next(rendered) for e in examples]


def tokenized_sources(
    sources: Sequence, student_tokenizer, teacher_tokenizer=None, student_role: str = "student"
) -> tuple[list[Example], list[TokenizedDoc], list[TokenizedDoc] | None]:
    """The examples of `sources` and their tokenizations with offsets by each tokenizer (None for a missing
    teacher tokenizer)."""
    require_offsets(student_tokenizer, "student")
    if teacher_tokenizer is not None:
        require_offsets(teacher_tokenizer, "teacher")
    docs = load_sources(sources)
    student_docs = tokenize_examples(student_tokenizer, docs, student_role)
    teacher_docs = (
        tokenize_examples(teacher_tokenizer, docs, "teacher") if teacher_tokenizer is not None else None
    )
    return docs, student_docs, teacher_docs


def build_windows(
    sources: Sequence,
    student_tokenizer,
    teacher_tokenizer=None,
    max_length: int = 256,
    max_windows: int | None = None,
    student_role: str = "student",
) -> list[Window]:
    """Examples from `sources`, tokenized by both tokenizers with offsets, packed into windows covering the
    same text on both sides (student side only without a teacher tokenizer); `student_role` names the first
    model in errors."""
    _, student_docs, teacher_docs = tokenized_sources(
        sources, student_tokenizer, teacher_tokenizer, student_role
    )
    windows = pack_windows(student_docs, teacher_docs, max_length)
    return windows[:max_windows] if max_windows else windows
