"""Tiny tokenizers of every kind sakd supports, trained in-process, and an independent decoder of token bytes.

Kinds: byte-level BPE (GPT-2, Qwen, SmolLM) with untrimmed and trimmed offsets; metaspace BPE with byte
fallback and a BOS (Llama, Mistral, Gemma); Unigram with metaspace (T5 style); WordPiece (BERT style, with
[CLS] before text). `token_bytes` reads each token's bytes from its vocabulary entry, never from offsets.
"""

from __future__ import annotations

import inspect
import json
from functools import cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

NON_ASCII = "naïve café — 日本語 🙂 Straße, ½ ∑ — «quoted» ok"
KINDS = ("byte_level", "byte_level_trimmed", "metaspace_bpe_bos", "unigram", "wordpiece")


def training_lines() -> list[str]:
    """Lines of source, and blocks of 12 lines, so that tokens such as newline + indent form."""
    lines = inspect.getsource(inspect).splitlines()
    blocks = ["\n".join(lines[i : i + 12]) for i in range(0, len(lines), 12)]
    return lines + blocks + [NON_ASCII] * 20


@cache
def byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 / Qwen style: byte-level BPE, vocabulary 500, no BOS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@cache
def byte_level_trimmed() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer with RoBERTa-style `trim_offsets`: its post-processor moves whitespace out of
    the offsets (a newline + indent token's end steps back)."""
    tokenizer = Tokenizer.from_str(byte_level().backend_tokenizer.to_str())
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@cache
def metaspace_bpe_bos() -> PreTrainedTokenizerFast:
    """Llama / Mistral / Gemma style: metaspace BPE (a space before the first word), byte fallback for
    characters outside the vocabulary, and a post-processor that puts <s> before text."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=60, show_progress=False
    )
    tokenizer.train_from_iterator(training_lines(), trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # the byte-fallback tokens, as SentencePiece models carry them
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


@cache
def unigram() -> PreTrainedTokenizerFast:
    """T5 style: Unigram with metaspace, vocabulary 300, unknown characters as <unk>."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["</s>", "<unk>", "<pad>"], unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(training_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@cache
def wordpiece() -> PreTrainedTokenizerFast:
    """BERT style: WordPiece that drops whitespace and lowercases, vocabulary 400, [CLS] text [SEP], no EOS."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]"], show_progress=False
    )
    tokenizer.train_from_iterator(training_lines(), trainer)
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]"))
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def tokenizer_of(kind: str) -> PreTrainedTokenizerFast:
    return globals()[kind]()


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character of every byte, inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes(tokenizer: PreTrainedTokenizerFast, token_id: int) -> bytes:
    """The bytes of text one token stands for, from its vocabulary entry (`vocabulary_bytes`)."""
    return vocabulary_bytes(tokenizer)[int(token_id)]


@cache
def vocabulary_bytes(tokenizer: PreTrainedTokenizerFast) -> list[bytes]:
    """Every token's bytes, read from its vocabulary entry: byte-level characters mapped back to bytes, "▁"
    as a space, "<0xNN>" as that byte, a WordPiece "##" continuation without its marker (a word-initial
    WordPiece token gets a leading space: the whitespace it dropped). Special tokens stand for b""."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    wordpiece = spec["model"]["type"] == "WordPiece"
    special = set(tokenizer.all_special_ids)
    table = []
    for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special:
            table.append(b"")
        elif byte_level:
            table.append(bytes(_byte_decoder()[c] for c in piece))
        elif wordpiece:
            table.append(piece[2:].encode() if piece.startswith("##") else b" " + piece.encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            table.append(bytes([int(piece[3:5], 16)]))
        else:
            table.append(piece.replace("▁", " ").encode())
    return table
