"""Tokenize documents with character offsets: where each token ends and how many UTF-8 bytes it covers.

Text is tokenized without special tokens, by the tokenizer's own normalizer, pre-tokenizer and model but not
its post-processor: a post-processor may trim offsets (RoBERTa-style `trim_offsets`, which moves a whitespace
token's end back), and the special tokens a model expects are added per window instead (`InputFormat`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from sakd.errors import UserError

log = logging.getLogger(__name__)


def require_offsets(tokenizer: Any, role: str) -> None:
    """Raise `UserError` unless `tokenizer` can report character offsets (only fast tokenizers can)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"the {role} tokenizer cannot give character offsets (a slow tokenizer): "
            "install `tokenizers` and use a fast tokenizer"
        )


@dataclass
class TokenizedDoc:
    """One document's tokens.

    `ids` (n,) int64: token ids. `ends` (n,) int64: character offset in the document where each token ends,
    made non-decreasing; the last text token ends at len(document). `nbytes` (n,) int64: UTF-8 bytes of the
    characters between the previous token's end and this token's end, so `nbytes.sum()` is the document's
    byte length (when it has any text token). A character split over several tokens (byte-level pieces) counts
    its bytes at its first piece and 0 at the others, and EOS carries 0: per-token byte counts only matter
    summed over whole characters, which every window and every alignment group holds.

    Chat and prompt-completion rows (`sakd.data.chat`) also set `target` (n,) bool: whether a token carries
    the loss (assistant content and end-of-turn tokens), and `content_ends` (n,) int64: where each content
    token ends in the concatenated assistant contents, -1 for every other token; there `nbytes` counts
    content bytes only. Plain documents leave both None: every token is a target and alignment uses `ends`.
    """

    ids: np.ndarray
    ends: np.ndarray
    nbytes: np.ndarray
    target: np.ndarray | None = None
    content_ends: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def utf8_prefix_bytes(text: str) -> np.ndarray:
    """(len(text) + 1,) int64: the UTF-8 byte length of text[:k] for every k."""
    # surrogatepass: a lone surrogate (possible in dataset text) counts 3 bytes, as Python would encode it
    codepoints = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    char_bytes = 1 + (codepoints >= 0x80).astype(np.int64) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    prefix = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(char_bytes, out=prefix[1:])
    return prefix


def tokenized_doc(
    text: str, ids: list[int], offsets: list[tuple[int, int]], eos_id: int | None
) -> TokenizedDoc:
    """Build a `TokenizedDoc` from a tokenizer's ids and (start, end) character offsets for `text`."""
    token_ids = np.asarray(ids, dtype=np.int64)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (n, 2) start, end
    ends = spans[:, 1].copy()
    if len(ends):
        # A token whose reported span runs into the next token's, while the next one reaches further, ends
        # where the next one starts: a metaspace tokenizer's prepended "▁" is reported over the first
        # character, (0, 1) before "import" at (0, 6), though it stands for no text at all.
        overlaps = (spans[1:, 0] < ends[:-1]) & (spans[1:, 1] > ends[:-1])
        ends[:-1][overlaps] = spans[1:, 0][overlaps]
        # pieces of one character (byte-level BPE) share offsets: only monotone end offsets are meaningful.
        # Whitespace that no token covers at the end of the text goes to the last token, so that the tokens
        # cover the whole text.
        ends = np.minimum(np.maximum.accumulate(ends), len(text))
        ends[-1] = len(text)
    prefix = utf8_prefix_bytes(text)
    ends_bytes = prefix[ends]
    nbytes = np.diff(ends_bytes, prepend=0)
    if eos_id is not None:
        token_ids = np.append(token_ids, eos_id)
        ends = np.append(ends, len(text))
        nbytes = np.append(nbytes, 0)
    return TokenizedDoc(ids=token_ids, ends=ends.astype(np.int64), nbytes=nbytes.astype(np.int64))


def text_tokenizer(tokenizer: Any) -> Tokenizer:
    """The fast tokenizer's backend without its post-processor: the same tokens, with untrimmed offsets."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = None
    return backend


def tokenize_documents(
    tokenizer: Any, docs: list[str], add_eos: bool = True, batch_size: int = 256
) -> list[TokenizedDoc]:
    """Tokenize `docs` in batches without special tokens; append EOS to each when asked and defined."""
    require_offsets(tokenizer, "given")
    eos_id = tokenizer.eos_token_id if add_eos else None
    backend = text_tokenizer(tokenizer)
    tokenized = []
    for start in range(0, len(docs), batch_size):
        batch = docs[start : start + batch_size]
        for text, encoding in zip(batch, backend.encode_batch(batch, add_special_tokens=False), strict=True):
            tokenized.append(tokenized_doc(text, encoding.ids, encoding.offsets, eos_id))
    return tokenized


@dataclass(frozen=True)
class InputFormat:
    """How one model's windows become its input ids: its padding id and the special tokens its tokenizer puts
    before any text (a BOS for Llama, Gemma, Mistral; nothing for GPT-2, Qwen, SmolLM)."""

    pad_id: int
    prefix: tuple[int, ...] = ()


def special_prefix(tokenizer: Any) -> tuple[int, ...]:
    """The ids the tokenizer itself adds before text (its post-processor, `add_bos_token`...), found by
    encoding a probe with and without special tokens."""
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return tuple(int(i) for i in full[:start])
    raise UserError(
        f"the tokenizer {type(tokenizer).__name__} changes the text tokens when it adds special tokens "
        f"({plain} -> {full}): sakd cannot tell which special tokens the model expects"
    )


def input_format(tokenizer: Any | None) -> InputFormat | None:
    """The `InputFormat` of a model with this tokenizer (None for None)."""
    if tokenizer is None:
        return None
    pad = tokenizer.pad_token_id
    return InputFormat(pad_id=pad if pad is not None else 0, prefix=special_prefix(tokenizer))


def log_input_format(tokenizer: Any, role: str) -> None:
    """Say which special tokens the model with this tokenizer gets, as decided from the tokenizer."""
    prefix = special_prefix(tokenizer)
    before = (
        f"{' '.join(tokenizer.convert_ids_to_tokens(list(prefix)))} before each window (its tokenizer adds it)"
        if prefix
        else "nothing before each window (its tokenizer adds no special token before text)"
    )
    after = f"{tokenizer.eos_token!r} after each document" if tokenizer.eos_token_id is not None else "no EOS"
    log.info("%s input: %s, %s", role, before, after)
