"""LoRA students: which parameters train and how many, the merged export against the adapted model, the
adapter-only checkpoint weights, and the targets sakd refuses (the LM head, FSDP)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sakd.config import LoraSpec
from sakd.errors import UserError
from sakd.models.head import check_head
from sakd.models.lora import (
    apply_lora,
    is_lora,
    load_student_weights,
    lora_parameter_count,
    merged_state_dict,
    save_pretrained_student,
    save_student_weights,
    trainable_parameters,
)
from sakd.models.tiny import dense_student_config, tiny_family_model

pytest.importorskip("peft")


def _student(seed: int = 0, tied: bool = True) -> torch.nn.Module:
    config = dense_student_config(96, hidden_size=32, layers=2, heads=2, max_length=64)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def _randomise_adapters(model: torch.nn.Module) -> None:
    """peft starts B at zero (the adapted model equals the base); random B makes the adapters count."""
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            if "lora_B" in name:
                p.normal_(std=0.5)


def test_only_the_adapters_train_and_their_count_is_r_times_in_plus_out():
    model = _student()
    base = {n: p.shape for n, p in model.named_parameters()}
    spec = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    expected = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj"):
            expected += 4 * (module.in_features + module.out_features)
    assert expected == 2 * 4 * ((32 + 32) + (32 + 32) + (96 + 32))  # 2 layers, f = 3 h
    assert lora_parameter_count(model, spec) == expected
    assert not is_lora(model), "counting must not adapt the model itself"

    apply_lora(model, spec)
    trainable = trainable_parameters(model)
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == sum(s.numel() for s in base.values())


def test_all_linear_leaves_the_head_out_and_counts_every_other_linear():
    model = _student()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    expected = sum(8 * (m.in_features + m.out_features) for m in linears)
    assert len(linears) == 2 * 7
    assert lora_parameter_count(model, LoraSpec(r=8)) == expected


def test_fresh_adapters_leave_the_logits_unchanged():
    model, reference = _student(), _student()
    apply_lora(model, LoraSpec(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 96, (2, 12))
    model.eval(), reference.eval()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_merged_export_loads_as_a_plain_model_with_the_adapted_logits(tmp_path, tied):
    from peft import PeftModel

    model = apply_lora(_student(tied=tied), LoraSpec(r=4, alpha=16, dropout=0.1))
    _randomise_adapters(model)
    model.eval()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        adapted = model(ids).logits
    save_pretrained_student(model, tmp_path / "final")

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert not any("lora" in n or "base_layer" in n for n in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "final" / "adapter_config.json").exists(), "the root must load as a plain model"

    reloaded = PeftModel.from_pretrained(_student(tied=tied), tmp_path / "final" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_is_the_plain_models_with_delta_weights():
    model = apply_lora(_student(), LoraSpec(r=2, alpha=6, target_modules=["q_proj"]))
    _randomise_adapters(model)
    merged = merged_state_dict(model)
    plain = _student().state_dict()
    assert merged.keys() == plain.keys()
    q = model.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + 3.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    assert torch.equal(
        merged["model.layers.0.self_attn.k_proj.weight"], plain["model.layers.0.self_attn.k_proj.weight"]
    )


def test_checkpoint_weights_hold_the_adapters_only_and_restore_them(tmp_path):
    model = apply_lora(_student(), LoraSpec(r=4))
    _randomise_adapters(model)
    save_student_weights(model, tmp_path / "student.safetensors")
    saved = load_file(str(tmp_path / "student.safetensors"))
    assert saved.keys() == trainable_parameters(model).keys()

    other = apply_lora(_student(), LoraSpec(r=4))
    load_student_weights(other, tmp_path / "student.safetensors")
    for name, p in other.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name
    fewer_targets = apply_lora(_student(), LoraSpec(r=4, target_modules=["q_proj"]))
    with pytest.raises(KeyError, match="LoRA weights"):
        load_student_weights(fewer_targets, tmp_path / "student.safetensors")


def test_an_adapter_on_the_lm_head_is_refused():
    with pytest.raises(UserError, match="LM head"):
        apply_lora(_student(tied=False), LoraSpec(r=4, target_modules=["q_proj", "lm_head"]))


def test_an_adapter_on_a_tied_input_embedding_is_refused():
    with pytest.raises(UserError, match="ties to its LM head"):
        apply_lora(_student(tied=True), LoraSpec(r=4, target_modules=["embed_tokens"]))


def test_targets_that_match_nothing_and_fsdp_are_user_errors():
    with pytest.raises(UserError, match="target_modules"):
        apply_lora(_student(), LoraSpec(r=4, target_modules=["no_such_layer"]))
    with pytest.raises(UserError, match="fsdp"):
        apply_lora(_student(), LoraSpec(r=4), sharded=True)


def test_head_check_passes_on_a_lora_student_with_a_transformed_head():
    """A family whose forward scales the logits (Cohere): sakd's head on the adapted model's hidden state
    still reproduces the adapted model's logits."""
    model = apply_lora(tiny_family_model("cohere", 96), LoraSpec(r=4))
    _randomise_adapters(model)
    check_head(model, torch.randint(0, 96, (2, 16)), None, "student")
