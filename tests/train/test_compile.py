"""train.compile: each decoder layer's forward compiled, checked against the uncompiled model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from helpers import metrics_records
from torch._dynamo.backends.registry import lookup_backend
from transformers import AutoModelForCausalLM

from sakd.config import validate
from sakd.models.tiny import dense_student_config
from sakd.train import sharding
from sakd.train.loop import train


def test_compiled_layers_match_eager_with_inductor():
    """The real backend (C++ code generated for the CPU): same logits and gradients."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(dense_student_config(64, hidden_size=16, layers=1, heads=2))
    compiled = copy.deepcopy(model)
    sharding.compile_layers(compiled)
    ids = torch.randint(0, 64, (2, 12))
    outputs = []
    for m in (model, compiled):
        logits = m(input_ids=ids).logits
        logits.square().mean().backward()
        outputs.append((logits.detach(), [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outputs[0][1], outputs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert list(compiled.state_dict()) == list(model.state_dict())


def test_training_with_compile_matches_training_without(make_raw, monkeypatch):
    """A whole run through the loop (hooks, loss captures, EMA, checkpoints) with compiled layers of the
    student and the teacher; a graph-capturing backend without code generation keeps it quick, and counts
    the graphs it is given."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return lookup_backend("aot_eager")(graph, example_inputs)

    monkeypatch.setattr(sharding, "COMPILE_BACKEND", backend)
    losses = {}
    for compiled in (False, True):
        raw = make_raw(f"compile-{compiled}", max_steps=3, compile=compiled)
        assert train(validate(raw))["step"] == 3
        losses[compiled] = [r["loss"] for r in metrics_records(Path(raw["output_dir"]), "train")]
    assert len(graphs) >= 2  # student and teacher layers
    assert len(losses[True]) == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
