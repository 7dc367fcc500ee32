"""Load teachers and students with transformers' Auto classes, from a hub id, a local folder or a GGUF file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sakd.errors import UserError
from sakd.models.gguf import is_gguf, load_gguf_model, pretrained_args

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> fp32 on CPU (bf16 is ~35x slower there), bf16 on GPUs that support it, else fp16."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def weights_dtype(precision: str) -> torch.dtype:
    return _DTYPES[precision]


def load_tokenizer(ref: str, role: str) -> PreTrainedTokenizerBase:
    name, gguf = pretrained_args(ref)
    try:
        tok = AutoTokenizer.from_pretrained(name, **gguf)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the {role} tokenizer from '{ref}' ({type(e).__name__}): give a local folder with "
            f"tokenizer files, a GGUF file or a reachable hub id in {role}.tokenizer"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(
            f"the {role} tokenizer '{ref}' cannot give character offsets (a slow tokenizer): "
            "convert it to a fast tokenizer (tokenizer.json)"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_model(
    ref: str,
    role: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    random_init: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A causal LM from `ref` (a GGUF file is dequantized to `dtype`); `random_init` builds it from its config
    with fresh weights (seeded)."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    name, gguf = pretrained_args(ref)
    try:
        if random_init:
            config = AutoConfig.from_pretrained(name, **gguf)
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        elif is_gguf(ref):
            model = load_gguf_model(ref, dtype, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the {role} model from '{ref}' ({type(e).__name__}: {str(e).splitlines()[0][:160]}): "
            f"give a local folder saved with save_pretrained, a GGUF file or a reachable hub id in {role}.model"
        ) from None
    return model


def freeze(model: nn.Module) -> nn.Module:
    """The teacher is passive: eval mode, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def lm_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise UserError(f"{type(model).__name__} has no linear LM head: sakd needs a causal LM with one")
    return head


def decoder(model: nn.Module) -> nn.Module:
    """The base model whose output is the final (normed) hidden state fed to the LM head."""
    return model.base_model


# `logits_to_keep` that keeps no position: forwards whose hidden states are captured (`capture_final_hidden`)
# and projected by sakd's chunked losses need none of the model's own logits, and even the last position's
# costs a (hidden x vocabulary) product per sequence, a few percent of a CPU step at 151,936.
NO_LOGITS = torch.zeros(0, dtype=torch.long)


@contextmanager
def capture_final_hidden(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the base model's last hidden state (B, T, H) through a forward hook, without editing the model."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        store["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder(unwrap(model)).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap(model).parameters())
