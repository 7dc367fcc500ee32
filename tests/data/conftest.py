"""Tiny tokenizers trained in-process on standard-library source, and documents to tokenize."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import tokenizer_kinds
from tokenizer_kinds import NON_ASCII
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def non_ascii_text() -> str:
    return NON_ASCII


@pytest.fixture(scope="session")
def documents() -> list[str]:
    """About forty documents: standard-library functions, JSON, and lines with non-ASCII characters."""
    docs = [textwrap.dedent(inspect.getsource(obj)) for obj in (json.dumps, json.loads, textwrap.wrap)]
    docs += [inspect.getsource(obj) for obj in (inspect.getdoc, inspect.cleandoc, inspect.getsourcelines)]
    docs += [f"{NON_ASCII} {i}\n\n  trailing spaces   " for i in range(4)]
    docs += ["🙂🙂 日本", "x", "  leading spaces and a tab\tthen text.\n"]
    docs += [line for line in inspect.getsource(inspect).splitlines()[:600:20] if line.strip()]
    return docs


@pytest.fixture(scope="session")
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    return tokenizer_kinds.byte_level()


@pytest.fixture(scope="session")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    return tokenizer_kinds.unigram()


@pytest.fixture(scope="session")
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    return tokenizer_kinds.wordpiece()


@pytest.fixture(scope="session")
def trimmed_byte_level_tokenizer() -> PreTrainedTokenizerFast:
    return tokenizer_kinds.byte_level_trimmed()


@pytest.fixture(scope="session")
def tokenizers_by_name() -> dict[str, PreTrainedTokenizerFast]:
    """Every tokenizer kind (`tokenizer_kinds.KINDS`), by name."""
    return {kind: tokenizer_kinds.tokenizer_of(kind) for kind in tokenizer_kinds.KINDS}
