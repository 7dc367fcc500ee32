"""Perplexity and bits per byte against direct computations: padding never counts, and every predicted token
does, whatever its tokenizer does with characters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizer_kinds import token_bytes, tokenizer_of
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.data.packing import pack_windows
from sakd.data.tokenize import input_format, tokenize_documents
from sakd.eval.metrics import lm_metrics
from sakd.models.tiny import dense_student_config


def test_metrics_match_direct_computation_and_ignore_padding(assets):
    tok = AutoTokenizer.from_pretrained(assets["student"])
    model = AutoModelForCausalLM.from_pretrained(assets["student"]).eval()
    windows = build_windows([str(assets["eval"])], tok, None, max_length=48)
    windows = windows[:5]
    # Shorten some windows so that batches carry padding.
    for w in windows[::2]:
        w.student_ids, w.student_bytes, w.student_group = (
            w.student_ids[:20],
            w.student_bytes[:20],
            w.student_group[:20],
        )
    batches = list(WindowLoader(windows, 3, seed=0, shuffle=False, drop_last=False, student=tok.pad_token_id))
    assert any((b.student.attention_mask == 0).any() for b in batches)
    got = lm_metrics(model, batches, "student", chunk_size=7)

    nll = 0.0
    tokens = nbytes = 0
    with torch.no_grad():
        for w in windows:  # one window at a time: no padding at all
            ids = torch.as_tensor(w.student_ids)[None]
            logits = model(ids).logits[0, :-1]
            ce = F.cross_entropy(logits, ids[0, 1:], reduction="none").double()
            target_bytes = torch.as_tensor(w.student_bytes[1:])
            nll += float(ce.sum())
            tokens += ce.numel()
            nbytes += int(target_bytes.sum())
    assert got["tokens"] == tokens and got["bytes"] == nbytes
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)
    # A random model: perplexity near the vocabulary size, never a capped or composite-loss number.
    assert 0.3 * len(tok) < got["perplexity"] < 3 * len(tok)


NON_ASCII_DOCS = [
    "Straße und Café: naïve Grüße, déjà vu, São Paulo.",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "emoji 🙂🚀🎉 and symbols ½ ∑ ≤ — «quoted»",
]


@pytest.mark.parametrize("kind", ["byte_level", "metaspace_bpe_bos"])
def test_bits_per_byte_counts_every_predicted_token_on_non_ascii_text(kind):
    """Against total NLL of every predicted token over the UTF-8 bytes of the predicted text, computed from
    the model's own full forward on the tokenizer's own encoding (its BOS included). A byte-level tokenizer
    splits these characters into several tokens, and byte fallback spells some of them byte by byte; each
    of those tokens must count."""
    tokenizer = tokenizer_of(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        dense_student_config(len(tokenizer), hidden_size=32, layers=2, heads=2, max_length=512)
    ).eval()
    docs = tokenize_documents(tokenizer, NON_ASCII_DOCS)
    windows = pack_windows(docs, None, max_length=500)
    assert len(windows) == 1
    batches = list(WindowLoader(windows, 1, seed=0, shuffle=False, student=input_format(tokenizer)))
    got = lm_metrics(model, batches, "student")

    prefix = [tokenizer.bos_token_id] if kind == "metaspace_bpe_bos" else []
    stream = []
    for text in NON_ASCII_DOCS:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prefix + stream])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prefix) : -1]  # each position predicts the next stream token
    nll = F.cross_entropy(logits, ids[0, len(prefix) + 1 :], reduction="sum").item()
    first = token_bytes(tokenizer, stream[0]).lstrip(b" ")  # the first token is predicted by nothing
    predicted_bytes = sum(len(text.encode()) for text in NON_ASCII_DOCS) - len(first)
    split = sum(len(token_bytes(tokenizer, i)) == 1 and token_bytes(tokenizer, i)[0] >= 0x80 for i in stream)
    assert split > 20  # the text does split characters into byte tokens
    assert got["bytes"] == predicted_bytes
    assert got["tokens"] == len(stream) - 1
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / predicted_bytes, rel=1e-5)
