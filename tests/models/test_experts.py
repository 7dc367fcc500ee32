"""Knowledge sources: every expert of an MoE layer for the four supported families, and dense layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from sakd.errors import UserError
from sakd.models.experts import (
    ExpertCapture,
    LayerCapture,
    dense_layer_sources,
    evenly_spaced_layers,
    find_moe_layers,
    knowledge_sources,
)

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
)
FAMILIES = {
    "mixtral": MixtralConfig(**COMMON, intermediate_size=40, num_local_experts=4),
    "qwen2_moe": Qwen2MoeConfig(
        **COMMON,
        intermediate_size=64,
        moe_intermediate_size=40,
        shared_expert_intermediate_size=24,
        num_experts=4,
    ),
    "qwen3_moe": Qwen3MoeConfig(
        **COMMON,
        intermediate_size=64,
        moe_intermediate_size=40,
        head_dim=8,
        num_experts=4,
        mlp_only_layers=[0],
    ),
    "olmoe": OlmoeConfig(**COMMON, intermediate_size=40, num_experts=4),
}
MOE_LAYERS = {"mixtral": [0, 1, 2], "qwen2_moe": [0, 1, 2], "qwen3_moe": [1, 2], "olmoe": [0, 1, 2]}


def _model(config) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    # The default init (std 0.02) and zero router weights make every expert output tiny and every routing a
    # tie: larger random weights make experts and routing distinguishable.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name or "shared_expert" in name or name.endswith("gate.weight"):
                param.normal_(0.0, 0.3)
    return model


def _manual_expert(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """act(x @ gate.T) * (x @ up.T) @ down.T from the fused weights: gate_up (E, 2I, H), down (E, H, I)."""
    inter = experts.down_proj.shape[-1]
    gate, up = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]  # (I, H) each
    return (F.silu(x @ gate.T) * (x @ up.T)) @ experts.down_proj[e].T


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_moe_layers_found(family):
    model = _model(FAMILIES[family])
    assert [i for i, _ in find_moe_layers(model)] == MOE_LAYERS[family]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_captured_experts_equal_manual_computation(family):
    model = _model(FAMILIES[family])
    layer_input = {}
    capture = ExpertCapture(model)
    assert capture.layer_index == MOE_LAYERS[family][len(MOE_LAYERS[family]) // 2]
    handle = capture.block.register_forward_pre_hook(lambda m, args: layer_input.update(x=args[0]))
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad(), capture:
        model(input_ids=ids)
    handle.remove()

    shared = family == "qwen2_moe"
    sources = capture.sources
    assert sources.shape == (2, 7, 4 + shared, 32) and capture.num_sources == 4 + shared
    assert not sources.requires_grad
    x = layer_input["x"].reshape(-1, 32)  # (N, H)
    for e in range(4):
        expected = _manual_expert(capture.experts, e, x).reshape(2, 7, 32)
        torch.testing.assert_close(sources[:, :, e], expected, rtol=1e-4, atol=1e-5)
    if shared:
        torch.testing.assert_close(sources[:, :, 4], capture.block.shared_expert(x).reshape(2, 7, 32))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_routed_mix_of_captured_experts_is_the_block_output(family):
    """The block's own output is the routing-weighted sum of the captured expert outputs (+ gated shared)."""
    model = _model(FAMILIES[family])
    capture = ExpertCapture(model)
    seen = {}
    handle = capture.block.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad(), capture:
        model(input_ids=torch.randint(0, 64, (2, 5)))
    handle.remove()
    x = seen["x"].reshape(-1, 32)  # (N, H)
    with torch.no_grad():
        _, top_weights, top_index = capture.block.gate(x)  # (N, k), (N, k)
    sources = capture.sources.reshape(x.shape[0], -1, 32)  # (N, E', H)
    mixed = (top_weights[..., None] * sources.gather(1, top_index[..., None].expand(-1, -1, 32))).sum(1)
    if family == "qwen2_moe":
        mixed = mixed + torch.sigmoid(capture.block.shared_expert_gate(x)) * sources[:, -1]
    torch.testing.assert_close(mixed, seen["out"].reshape(-1, 32), rtol=1e-4, atol=1e-5)


def test_layer_and_expert_choice():
    model = _model(FAMILIES["qwen2_moe"])
    capture = ExpertCapture(model, layer_index=2, expert_ids=[3, 1], include_shared=False)
    with torch.no_grad(), capture:
        model(input_ids=torch.randint(0, 64, (1, 4)))
    assert capture.sources.shape == (1, 4, 2, 32)
    with pytest.raises(UserError, match="not an MoE layer"):
        ExpertCapture(_model(FAMILIES["qwen3_moe"]), layer_index=0)
    with pytest.raises(UserError, match="expert_ids"):
        ExpertCapture(model, expert_ids=[4])


def test_capture_leaves_the_model_unchanged():
    model = _model(FAMILIES["qwen3_moe"])
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with ExpertCapture(model) as capture:
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    torch.testing.assert_close(before, during)
    torch.testing.assert_close(before, after)
    assert capture._handle is None and not capture.block._forward_pre_hooks


class _UnknownExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 32))


def test_config_with_experts_but_no_expert_module_is_an_error():
    config = LlamaConfig(
        **{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}, intermediate_size=40
    )
    model = AutoModelForCausalLM.from_config(config)
    model.config.num_experts = 4
    with pytest.raises(UserError, match="LlamaForCausalLM declares 4 experts"):
        find_moe_layers(model)
    with pytest.raises(UserError, match="LlamaForCausalLM"):
        knowledge_sources(model, num_sources=2)


def test_unknown_expert_layout_is_an_error_naming_the_class():
    model = _model(FAMILIES["mixtral"])
    model.model.layers[1].mlp.experts = _UnknownExperts()
    with pytest.raises(UserError, match="_UnknownExperts in MixtralSparseMoeBlock"):
        find_moe_layers(model)


def test_dense_sources():
    config = LlamaConfig(
        **{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}, intermediate_size=40
    )
    config.num_hidden_layers = 4
    model = AutoModelForCausalLM.from_config(config).eval()
    assert find_moe_layers(model) == []
    capture = knowledge_sources(model, num_sources=2)
    assert isinstance(capture, LayerCapture) and capture.layer_indices == [1, 3]
    ids = torch.randint(0, 64, (2, 5))
    with capture:
        out = model(input_ids=ids, output_hidden_states=True)
    assert capture.sources.shape == (2, 5, 2, 32) and not capture.sources.requires_grad
    # hidden_states[i + 1] is layer i's output, except the last entry, which has the final norm applied.
    torch.testing.assert_close(capture.sources[:, :, 0], out.hidden_states[2])
    with dense_layer_sources(model, 4) as all_layers:
        model(input_ids=ids)
    assert all_layers.layer_indices == [0, 1, 2, 3]


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(24, 4) == [5, 11, 17, 23]
    assert evenly_spaced_layers(3, 1) == [2]
    with pytest.raises(UserError):
        evenly_spaced_layers(2, 3)


def test_student_layer_capture_keeps_the_graph():
    config = LlamaConfig(
        **{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}, intermediate_size=40
    )
    model = AutoModelForCausalLM.from_config(config)
    with LayerCapture(model, [0, 2], detach=False) as capture:
        model(input_ids=torch.randint(0, 64, (1, 3)))
    capture.outputs[0].sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
