"""What the bench's comparisons with TRL share: their sizes and a tokenizer of an exact vocabulary size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrlSizes:
    vocabs: tuple[int, ...]
    batch_size: int
    max_length: int
    teacher_hidden: int
    student_hidden: int
    layers: int
    warmup_steps: int
    steps: int


def word_tokenizer(vocab_size: int):
    """A whitespace-split word-level tokenizer with exactly `vocab_size` entries: EOS, PAD, UNK, w0, w1, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sakd.models.tiny import EOS, PAD

    vocab = {EOS: 0, PAD: 1, "[UNK]": 2}
    vocab.update({f"w{i}": i + 3 for i in range(vocab_size - 3)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token="[UNK]")
