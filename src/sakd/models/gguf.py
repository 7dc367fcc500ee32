"""GGUF files (llama.cpp's single-file format) as teachers and students, through transformers' GGUF support.

transformers dequantizes a GGUF on load but keeps it flagged as quantized, which refuses `.float()` and
`save_pretrained`; the weights are therefore copied into a model built from the same config, an ordinary one
that casts, saves and trains.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from sakd.errors import UserError


def is_gguf(ref: str) -> bool:
    return ref.lower().endswith(".gguf")


def pretrained_args(ref: str) -> tuple[str, dict[str, Any]]:
    """`(name_or_path, kwargs)` for transformers' `from_pretrained`: a GGUF file is given as its folder plus
    `gguf_file`; any other reference is passed on as it is."""
    if not is_gguf(ref):
        return ref, {}
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"'{ref}' is a GGUF file, which needs the gguf package: pip install \"sakd[gguf]\"")
    path = Path(ref).expanduser()
    return str(path.parent), {"gguf_file": path.name}


def load_gguf_model(ref: str, dtype: torch.dtype, **model_kwargs: Any) -> nn.Module:
    """The GGUF model at `ref`, dequantized to `dtype`, as a plain model of its architecture.

    `model_kwargs` (e.g. `attn_implementation`) go to the rebuilt model."""
    folder, gguf = pretrained_args(ref)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **gguf)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the marker that makes transformers refuse to cast or save
    with no_init_weights():  # every weight is overwritten below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **model_kwargs)
    model.tie_weights()  # skipped with the initialisation: untied, the LM head would train apart from the input
    model.load_state_dict(loaded.state_dict(), strict=True)
    # Buffers left out of the state dict (rotary frequencies, embedding scales) may be set by the weight
    # initialisation that was skipped: take them from the loaded model too.
    buffers = dict(loaded.named_buffers())
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    model.config.name_or_path = ref
    return model
