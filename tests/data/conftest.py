"""Tiny tokenizers trained in-process on standard-library source, and documents to tokenize."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

NON_ASCII = "naïve café — 日本語 🙂 Straße, ½ ∑ — «quoted» ok"


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


def _training_lines() -> list[str]:
    return inspect.getsource(inspect).splitlines() + [NON_ASCII] * 20


@pytest.fixture(scope="session")
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 / Qwen style: byte-level BPE, vocabulary 500."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_training_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Llama / T5 style: Unigram with metaspace, vocabulary 300, unknown characters as <unk>."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["</s>", "<unk>", "<pad>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(_training_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT style: WordPiece that drops whitespace and lowercases, vocabulary 400, no EOS token."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[PAD]"])
    tokenizer.train_from_iterator(_training_lines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="session")
def trimmed_byte_level_tokenizer(byte_level_tokenizer) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer with `trim_offsets`: offsets leave out leading spaces (RoBERTa style)."""
    tokenizer = Tokenizer.from_str(byte_level_tokenizer.backend_tokenizer.to_str())
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def tokenizers_by_name(
    byte_level_tokenizer, trimmed_byte_level_tokenizer, metaspace_tokenizer, wordpiece_tokenizer
) -> dict[str, PreTrainedTokenizerFast]:
    return {
        "byte_level": byte_level_tokenizer,
        "byte_level_trimmed": trimmed_byte_level_tokenizer,
        "metaspace": metaspace_tokenizer,
        "wordpiece": wordpiece_tokenizer,
    }
