"""Perplexity and bits per byte against a direct computation (padding never counts)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.eval.metrics import lm_metrics


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
    batches = list(
        WindowLoader(windows, 3, seed=0, shuffle=False, drop_last=False, student_pad_id=tok.pad_token_id)
    )
    assert any((b["student_attention_mask"] == 0).any() for b in batches)
    got = lm_metrics(model, batches, "student", chunk_size=7)

    nll = nll_text = 0.0
    tokens = nbytes = 0
    with torch.no_grad():
        for w in windows:  # one window at a time: no padding at all
            ids = torch.as_tensor(w.student_ids)[None]
            logits = model(ids).logits[0, :-1]
            ce = F.cross_entropy(logits, ids[0, 1:], reduction="none").double()
            target_bytes = torch.as_tensor(w.student_bytes[1:])
            nll += float(ce.sum())
            nll_text += float(ce[target_bytes > 0].sum())
            tokens += ce.numel()
            nbytes += int(target_bytes.sum())
    assert got["tokens"] == tokens and got["bytes"] == nbytes
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll_text / math.log(2) / nbytes, rel=1e-4)
    # A random model: perplexity near the vocabulary size, never a capped or composite-loss number.
    assert 0.3 * len(tok) < got["perplexity"] < 3 * len(tok)
