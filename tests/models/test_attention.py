"""Attention maps: eager gives real maps, sdpa gives none, and that is an error, never silently empty."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

from sakd.errors import UserError
from sakd.models.attention import (
    attention_implementation,
    capture_attentions,
    current_attention_implementation,
    require_attention_maps,
)

LLAMA = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _llama(implementation: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LLAMA, attn_implementation=implementation)


def test_attention_implementation_choice():
    assert attention_implementation(needs_maps=True, requested="auto") == "eager"
    assert attention_implementation(needs_maps=True, requested=None) == "eager"
    assert attention_implementation(needs_maps=True, requested="eager") == "eager"
    assert attention_implementation(needs_maps=False, requested="auto") is None  # the model's own default
    assert attention_implementation(needs_maps=False, requested="flash_attention_2") == "flash_attention_2"
    with pytest.raises(UserError, match="sdpa computes attention without materialising"):
        attention_implementation(needs_maps=True, requested="sdpa")
    with pytest.raises(UserError, match="returns no attention maps"):
        attention_implementation(needs_maps=True, requested="flash_attention_2")


def test_sdpa_outputs_have_no_maps_and_that_is_an_error():
    """The behaviour this module guards against: sdpa answers output_attentions=True with nothing."""
    ids = torch.randint(0, 64, (2, 6))
    sdpa = _llama("sdpa")
    assert current_attention_implementation(sdpa) == "sdpa"
    outputs = sdpa(input_ids=ids, output_attentions=True)
    assert not outputs.attentions  # None or an empty tuple, without an exception
    with pytest.raises(UserError, match="student returned no attention maps"):
        require_attention_maps(outputs, role="student")

    eager = _llama("eager")
    maps = require_attention_maps(eager(input_ids=ids, output_attentions=True))
    assert len(maps) == 2 and maps[0].shape == (2, 4, 6, 6)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 4, 6))
    with pytest.raises(UserError):
        require_attention_maps(None)
    with pytest.raises(UserError):
        require_attention_maps((maps[0], None))


def test_capture_matches_output_attentions_and_keeps_the_graph():
    model = _llama("eager")
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with capture_attentions(model, layer_indices=[0, 1]) as capture:
        outputs = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(capture.maps) == 2
    for captured, returned in zip(capture.maps, outputs.attentions, strict=True):
        torch.testing.assert_close(captured, returned)
    assert (capture.maps[1][1, :, :, 4:] == 0).all()  # padded keys get no attention
    capture.maps[1].sum().backward()
    assert model.model.layers[1].self_attn.q_proj.weight.grad is not None
    # Ours are removed (transformers installs output-recording hooks of its own).
    hooks = model.model.layers[0].self_attn._forward_hooks.values()
    assert not [h for h in hooks if "capture_attentions" in h.__qualname__]


def test_capture_refuses_sdpa_and_catches_missing_maps():
    with pytest.raises(UserError, match="attn_implementation='eager'"):
        with capture_attentions(_llama("sdpa"), role="student"):
            pass
    model = _llama("eager")
    with capture_attentions(model, role="student") as capture:
        model.set_attn_implementation("sdpa")  # switched behind the capture's back
        model(input_ids=torch.randint(0, 64, (1, 4)))
    with pytest.raises(UserError, match="student returned no attention maps"):
        _ = capture.maps
    fresh = capture_attentions(_llama("eager"))
    with pytest.raises(RuntimeError, match="no forward pass"):
        _ = fresh.maps
    with pytest.raises(UserError, match="within"):
        capture_attentions(model, layer_indices=[2])


def test_capture_on_moe_teacher_is_detached():
    config = Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    teacher = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with capture_attentions(teacher, detach=True, role="teacher") as capture:
        teacher(input_ids=torch.randint(0, 64, (2, 5)))
    (attn,) = capture.maps
    assert attn.shape == (2, 4, 5, 5) and not attn.requires_grad


def test_auto_keeps_the_models_own_default(tmp_path):
    """ "auto" loads a Llama with sdpa, and a Gemma 2 (which refuses sdpa) with its own eager attention."""
    from sakd.models.load import load_model
    from sakd.models.tiny import tiny_family_model

    for family, expected in (("llama", "sdpa"), ("gemma2", "eager")):
        tiny_family_model(family, 64).save_pretrained(tmp_path / family)
        model = load_model(str(tmp_path / family), "student", torch.float32, attention_implementation(False))
        assert current_attention_implementation(model) == expected
