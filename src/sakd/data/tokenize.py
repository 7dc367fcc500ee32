"""Tokenize documents with character offsets: where each token ends and how many UTF-8 bytes it covers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sakd.errors import UserError


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
    byte length (when it has any text token); special tokens and later pieces of a character split over several tokens get 0.
    """

    ids: np.ndarray
    ends: np.ndarray
    nbytes: np.ndarray

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
    ends = np.fromiter((end for _, end in offsets), dtype=np.int64, count=len(offsets))
    if len(ends):
        # pieces of one character (byte-level BPE) share offsets and trimmed offsets can step back: only
        # monotone end offsets are meaningful. Whitespace that no token covers at the end of the text goes
        # to the last token, so that the tokens cover the whole text.
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


def tokenize_documents(
    tokenizer: Any, docs: list[str], add_eos: bool = True, batch_size: int = 256
) -> list[TokenizedDoc]:
    """Tokenize `docs` in batches without special tokens; append EOS to each when asked and defined."""
    require_offsets(tokenizer, "given")
    eos_id = tokenizer.eos_token_id if add_eos else None
    tokenized = []
    for start in range(0, len(docs), batch_size):
        batch = docs[start : start + batch_size]
        encoded = tokenizer(
            batch,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,
        )
        for text, ids, offsets in zip(batch, encoded["input_ids"], encoded["offset_mapping"], strict=True):
            tokenized.append(tokenized_doc(text, ids, offsets, eos_id))
    return tokenized
