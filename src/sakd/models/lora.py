"""LoRA students through peft: low-rank adapters are injected into the student's linear layers in place, so the
model stays the transformers class the rest of sakd reads (its decoder, its LM head); only the adapters train.

Checkpoints hold only the adapters (the frozen weights come back from `student.model` on resume); `final/`
holds the merged weights, which load as a plain model, and the adapter in `final/adapter` (peft's format).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from sakd.errors import UserError

if TYPE_CHECKING:
    from sakd.config import LoraSpec

ADAPTER_DIR = "adapter"
ADAPTER_NAME = "default"
# The peft wrapper is kept on the model as a plain attribute (not a submodule, which would make a cycle in
# the module tree): it saves the adapter in peft's own format.
_PEFT_MODEL = "_sakd_peft_model"


def apply_lora(model: nn.Module, spec: LoraSpec | None, sharded: bool = False) -> nn.Module:
    """`model` with LoRA adapters in the layers `spec` targets and every other weight frozen (`spec` None:
    unchanged). `sharded`: the student is to be split with FSDP, which LoRA students do not support."""
    if spec is None:
        return model
    if sharded:
        raise UserError(
            "student.lora does not support train.strategy=fsdp over several processes: use ddp (a LoRA "
            "student has no gradients or optimizer state for its frozen weights), or drop student.lora"
        )
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError(
            "student.lora needs the peft package: pip install peft (or pip install 'sakd[lora]')"
        ) from None
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    except ValueError as e:
        raise UserError(
            f"student.lora.target_modules {spec.target_modules!r} do not fit {type(model).__name__} "
            f"({str(e).splitlines()[0][:200]}): name its linear layers (e.g. q_proj, v_proj) or use all-linear"
        ) from None
    _refuse_adapted_head(model)
    object.__setattr__(model, _PEFT_MODEL, peft_model)
    return model


def _refuse_adapted_head(model: nn.Module) -> None:
    """sakd computes the logits from the LM head's weight, so an adapter on the head would be bypassed; an
    adapter on an input embedding tied to the head would make the exported head differ from the trained one."""
    from peft.tuners.lora import LoraLayer

    if isinstance(model.get_output_embeddings(), LoraLayer):
        raise UserError(
            "student.lora.target_modules includes the LM head: sakd applies the head from its weight and "
            "would bypass the adapter; leave the head out (all-linear does)"
        )
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and isinstance(model.get_input_embeddings(), LoraLayer):
        raise UserError(
            "student.lora.target_modules includes the input embedding, which this student ties to its LM head: "
            "leave the embedding out"
        )


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, _PEFT_MODEL)


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def lora_parameter_count(model: nn.Module, spec: LoraSpec) -> int:
    """The trainable parameters `spec` gives `model` (a copy is adapted; a meta-device model reads nothing)."""
    adapted = apply_lora(copy.deepcopy(model), spec)
    return sum(p.numel() for p in trainable_parameters(adapted).values())


def save_student_weights(model: nn.Module, path: Path) -> None:
    """A checkpoint's student weights: a LoRA student's adapters only, any other student's every weight."""
    if not is_lora(model):
        save_safetensors_model(model, str(path))
        return
    save_file({k: v.detach().contiguous() for k, v in trainable_parameters(model).items()}, str(path))


@torch.no_grad()
def load_student_weights(model: nn.Module, path: Path) -> None:
    """Inverse of `save_student_weights`; weights that do not fit the model raise RuntimeError or KeyError."""
    if not is_lora(model):
        load_safetensors_model(model, str(path))
        return
    saved, params = load_file(str(path)), trainable_parameters(model)
    if saved.keys() != params.keys():
        missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
        raise KeyError(f"LoRA weights missing: {missing[:3]}, unexpected: {unexpected[:3]}")
    for name, p in params.items():
        p.copy_(saved[name])


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model without adapters, each adapted weight replaced by weight + its adapter's
    delta (scale x B A), under the names of the model before LoRA; the adapters stay in place."""
    from peft.tuners.lora import LoraLayer

    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    merged = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        owner, base, attr = key.rpartition(".base_layer.")
        if base and owner in adapted and attr == "weight":
            delta = adapted[owner].get_delta_weight(ADAPTER_NAME)
            value = (value.float() + delta.float()).to(value.dtype)
        merged[f"{owner}.{attr}" if base else key] = value
    return merged


def save_pretrained_student(
    model: nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """`folder` as a Hugging Face model folder; a LoRA student's holds the merged weights, and its adapter
    (adapter_config.json and weights, peft's format) in folder/adapter."""
    if not is_lora(model):
        model.save_pretrained(folder, state_dict=state_dict)
        return
    model.save_pretrained(folder, state_dict=merged_state_dict(model))
    getattr(model, _PEFT_MODEL).save_pretrained(Path(folder) / ADAPTER_DIR)
