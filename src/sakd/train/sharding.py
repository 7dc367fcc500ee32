"""Sharding over processes with PyTorch FSDP2 (`fully_shard`): the student (`train.strategy: fsdp`) and the
teacher (`teacher.placement: shard`), plus host offload of the teacher (`teacher.placement: offload`).

Each decoder layer is its own FSDP unit and the root holds the embeddings, final norm and LM head. FSDP2
reduce-scatters (averages) gradients like DDP all-reduces them, so the objective's loss scaling is unchanged.
Checkpoints stay in the plain single-process format (full weights, optimizer state keyed by position), so a
run can move between DDP, FSDP and one process: `gather_full_state` builds that on the main process, and
`load_full_weights` / `load_full_optimizer` spread it back over the shards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sakd.errors import UserError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of a Hugging Face causal LM (`model.model.layers` in Llama, Qwen, Mixtral...)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        module: Any = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise UserError(
        f"cannot find the decoder layers of {type(model).__name__} to shard: use train.strategy=ddp / "
        "teacher.placement=replicate for this model"
    )


COMPILE_BACKEND = "inductor"


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer's forward, in place. Only the forward is compiled: hooks (FSDP2's,
    the offload's, the loss's captures) run around it as before, and the weights keep their names."""
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, backend=COMPILE_BACKEND)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 over all processes: one unit per decoder layer, then the root. In place; returns `model`. A model
    in host memory is moved to the device unit by unit as it is split (`fully_shard` moves a unit's states to
    its mesh's device), so the device never holds the whole model."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(value):
    """A DTensor's full value (a collective), anything else unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def place_teacher(teacher: nn.Module, placement: str, device: torch.device, num_processes: int) -> nn.Module:
    """Put the frozen teacher where `teacher.placement` says (on a CPU-only machine offload changes nothing
    but adds its hooks)."""
    if placement == "shard" and num_processes > 1:
        return shard(teacher)  # from host memory: each unit visits the device whole only while it is split
    if placement == "offload":
        return offload(teacher, device)
    return teacher.to(device)  # replicate (and shard on one process)


def offload(model: nn.Module, device: torch.device, host: str = "cpu") -> nn.Module:
    """Keep the decoder layers in host memory and move each to `device` for its own forward only; the
    embeddings, final norm and LM head stay on `device` (the distillation loss applies the head itself).
    Device memory: those plus one layer. In place; returns `model`."""
    layers = decoder_layers(model)

    def place_outside(module: nn.Module) -> None:
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None:
                tensor.data = tensor.data.to(device)
        for child in module.children():
            if child is layers:
                continue
            if any(m is layers for m in child.modules()):
                place_outside(child)
            else:
                child.to(device)

    def arrive(module: nn.Module, _args) -> None:  # hooks return None: a value would replace args / output
        module.to(device)

    def leave(module: nn.Module, _args, _output) -> None:
        module.to(host)

    place_outside(model)
    for layer in layers:
        layer.to(host)
        layer.register_forward_pre_hook(arrive)
        layer.register_forward_hook(leave)
    model.sakd_offloaded = True
    return model


def _parameter_order(model: nn.Module, optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order of its groups: what a position key stands for."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _swap_keys(optim: dict[str, Any], key) -> dict[str, Any]:
    """An optimizer state dict with every parameter key (in `state` and the groups) replaced by `key(k)`."""
    groups = [{**g, "params": [key(p) for p in g["params"]]} for g in optim["param_groups"]]
    return {"state": {key(k): v for k, v in optim["state"].items()}, "param_groups": groups}


def gather_full_state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full weights and optimizer state of a sharded model, on the main process (empty elsewhere). Every
    process must call it. The optimizer state is keyed by position, like `optimizer.state_dict()` of an
    unsharded run."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights, optim = get_state_dict(model, optimizer, options=options)
    if not weights:
        return {}, {}
    position = {name: i for i, name in enumerate(_parameter_order(model, optimizer))}
    return weights, _swap_keys(optim, position.__getitem__)


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full weights, read by every process, into its shards (every process must call it). A tied
    weight saved under one of its names is filled in under the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = dict(weights)
    for names in tied_groups(model):
        present = [n for n in names if n in weights]
        for name in names:
            if present and name not in weights:
                weights[name] = weights[present[0]]
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def load_full_optimizer(model: nn.Module, optimizer, optim: dict[str, Any]) -> None:
    """Load a position-keyed optimizer state, read by every process, into the sharded optimizer (every
    process must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper
    order = _parameter_order(model, optimizer)
    keyed = _swap_keys(optim, order.__getitem__)
    set_optimizer_state_dict(model, optimizer, keyed, options=StateDictOptions(full_state_dict=True))


def gather_full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights of a sharded model on the main process (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names of the model's state that are one tensor (a tied embedding and LM head), each group sorted."""
    by_tensor: dict[int, list[str]] = {}
    for name, value in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(value), []).append(name)
    return [sorted(names) for names in by_tensor.values() if len(names) > 1]


def without_tied_copies(weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered weights with a tied tensor under its first name only, as `safetensors.save_model` writes
    an unsharded model (so checkpoints of both are alike)."""
    drop = {name for group in tied_groups(model) for name in group[1:]}
    return {name: value.contiguous() for name, value in weights.items() if name not in drop}
