"""Knowledge sources from the teacher, captured through forward hooks without editing the model.

For an MoE teacher the sources are the outputs of EVERY expert of one MoE layer on that layer's input (no
routing, so each token sees all E experts); for a dense teacher they are the hidden states of E evenly spaced
decoder layers. Both captures are context managers with the same surface: `num_sources`, and `sources`
(B, T, E, H) after a forward pass, detached.

Expert layouts (transformers 5.x): Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE store their experts FUSED, one
module with stacked `gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I) parameters, and compute
`down[e] @ (act(gate) * up)` with `gate, up = (gate_up[e] @ x).chunk(2)`. The flags that transformers'
`use_experts_implementation` sets on such modules (`is_transposed`, `has_bias`, `has_gate`,
`has_post_expert_norm`, a class's own `_apply_gate`) are honoured, so other fused layouts work the same way.
A list of per-expert modules (the older layout) is also accepted, and Qwen2-MoE's shared expert is an extra
source. A model whose config declares experts but whose layers hold no recognised expert module is an error,
never silently treated as dense.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch
from torch import nn

from sakd.errors import UserError
from sakd.models.load import decoder, unwrap

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def declared_num_experts(model: nn.Module) -> int:
    """The number of experts the model's config declares (0 for a dense model)."""
    config = getattr(unwrap(model), "config", None)
    if config is None:
        return 0
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks (`base_model.layers` for every supported family)."""
    base = decoder(unwrap(model))
    layers = getattr(base, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    config = getattr(unwrap(model), "config", None)
    depth = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise UserError(
        f"cannot find the decoder layers of {type(unwrap(model)).__name__}: expected `base_model.layers` "
        "(an nn.ModuleList of transformer blocks)"
    )


def _is_fused(experts: nn.Module) -> bool:
    down = getattr(experts, "down_proj", None)
    up = getattr(experts, "gate_up_proj", getattr(experts, "up_proj", None))
    return all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in (down, up))


def _is_expert_list(experts: nn.Module) -> bool:
    return isinstance(experts, nn.ModuleList) and len(experts) > 0


def _expert_container(layer: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(MoE block, its experts module) among the layer's direct children, or None for a dense layer."""
    for child in layer.children():
        experts = getattr(child, "experts", None)
        if isinstance(experts, nn.Module):
            if not (_is_fused(experts) or _is_expert_list(experts)):
                raise UserError(
                    f"unsupported MoE expert layout {type(experts).__name__} in {type(child).__name__}: sakd "
                    "reads fused experts (3-D `gate_up_proj`/`up_proj` and `down_proj` parameters, as in "
                    "Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE) or an nn.ModuleList of expert modules"
                )
            return child, experts
    return None


def find_moe_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, MoE block) for every MoE layer; [] for a dense model.

    Raises UserError when the config declares experts but no layer holds a recognised expert module, or when
    an expert module has an unknown layout: such a model must never pass as dense, which would silently drop
    every expert-level loss.
    """
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        container = _expert_container(layer)
        if container is not None:
            found.append((index, container[0]))
    if not found and declared_num_experts(model) > 0:
        raise UserError(
            f"{type(unwrap(model)).__name__} declares {declared_num_experts(model)} experts in its config "
            "but no decoder layer holds a recognised MoE block (a child with an `experts` module): this MoE "
            "layout is not supported; supported are Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE"
        )
    return found


def _fused_expert_outputs(experts: nn.Module, x: torch.Tensor, expert_ids: Sequence[int]) -> torch.Tensor:
    """Every chosen expert of a fused module on every row, as the module itself computes one. (N, H) ->
    (N, E, H)."""
    has_gate = getattr(experts, "has_gate", hasattr(experts, "gate_up_proj"))
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    outputs = []
    for e in expert_ids:
        up_weight, down_weight = getattr(experts, up_name)[e], experts.down_proj[e]
        # Non-transposed weights are (out, in) like nn.Linear's; transposed ones are (in, out).
        hidden = x @ up_weight if transposed else x @ up_weight.T  # (N, 2I) or (N, I)
        if has_bias:
            hidden = hidden + getattr(experts, f"{up_name}_bias")[e]
        if has_gate and hasattr(experts, "_apply_gate"):
            hidden = experts._apply_gate(hidden)  # (N, I)
        elif has_gate:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = experts.act_fn(gate) * up  # (N, I)
        else:
            hidden = experts.act_fn(hidden)  # (N, I)
        out = hidden @ down_weight if transposed else hidden @ down_weight.T  # (N, H)
        if has_bias:
            out = out + experts.down_proj_bias[e]
        if getattr(experts, "has_post_expert_norm", False):
            out = experts.post_expert_norm(out)
        outputs.append(out)
    return torch.stack(outputs, dim=1)


def _num_experts(experts: nn.Module) -> int:
    return len(experts) if _is_expert_list(experts) else int(experts.down_proj.shape[0])


class ExpertCapture:
    """Context manager: on each forward, run every expert of one MoE layer on that layer's input.

    model: the teacher (wrappers are unwrapped). layer_index: the decoder layer whose MoE block is used
    (default: the middle MoE layer). expert_ids: which experts (default all). include_shared: add the shared
    expert (Qwen2-MoE), ungated, as the last source. After a forward inside the `with`, `sources` is
    (B, T, E, H) in the teacher's dtype, detached; each forward overwrites it.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_index: int | None = None,
        expert_ids: Sequence[int] | None = None,
        include_shared: bool = True,
    ):
        moe_layers = find_moe_layers(model)
        if not moe_layers:
            raise UserError(
                f"{type(unwrap(model)).__name__} has no MoE layer: "
                "use dense_layer_sources for a dense teacher"
            )
        by_index = dict(moe_layers)
        if layer_index is None:
            layer_index = moe_layers[len(moe_layers) // 2][0]
        if layer_index not in by_index:
            raise UserError(
                f"decoder layer {layer_index} is not an MoE layer; MoE layers: {sorted(by_index)}"
            )
        self.layer_index = layer_index
        self.block = by_index[layer_index]
        self.experts = self.block.experts
        total = _num_experts(self.experts)
        self.expert_ids = list(range(total)) if expert_ids is None else list(expert_ids)
        if not self.expert_ids or any(not 0 <= e < total for e in self.expert_ids):
            raise UserError(f"expert_ids {self.expert_ids} must be a non-empty subset of 0..{total - 1}")
        shared = getattr(self.block, "shared_expert", None)
        self.shared_expert = shared if include_shared and isinstance(shared, nn.Module) else None
        self.num_sources = len(self.expert_ids) + (self.shared_expert is not None)
        self._sources: torch.Tensor | None = None
        self._handle = None

    @torch.no_grad()
    def _hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
        flat = hidden.detach().reshape(-1, hidden.shape[-1])  # (B*T, H)
        if _is_expert_list(self.experts):
            outputs = torch.stack([self.experts[e](flat) for e in self.expert_ids], dim=1)  # (B*T, E, H)
        else:
            outputs = _fused_expert_outputs(self.experts, flat, self.expert_ids)  # (B*T, E, H)
        if self.shared_expert is not None:
            outputs = torch.cat([outputs, self.shared_expert(flat)[:, None]], dim=1)
        self._sources = outputs.reshape(*hidden.shape[:-1], self.num_sources, hidden.shape[-1])

    @property
    def sources(self) -> torch.Tensor:
        """(B, T, E, H) per-expert outputs of the last forward."""
        if self._sources is None:
            raise RuntimeError("no forward pass ran inside the ExpertCapture context")
        return self._sources

    def __enter__(self) -> ExpertCapture:
        self._sources = None
        self._handle = self.block.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def evenly_spaced_layers(num_layers: int, num_sources: int) -> list[int]:
    """num_sources layer indices spread over the depth, ending at the last one: (24, 4) -> [5, 11, 17, 23]."""
    if not 1 <= num_sources <= num_layers:
        raise UserError(f"cannot take {num_sources} sources from a model with {num_layers} layers")
    return [round((i + 1) * num_layers / num_sources) - 1 for i in range(num_sources)]


class LayerCapture:
    """Context manager: record the outputs of chosen decoder layers on each forward.

    After a forward, `outputs[i]` is layer `layer_indices[i]`'s output hidden state (B, T, H) and `sources`
    stacks them to (B, T, E, H). `detach` (default True, for the teacher) drops the graph; a student capture
    for layerwise losses passes detach=False.
    """

    def __init__(self, model: nn.Module, layer_indices: Sequence[int], detach: bool = True):
        layers = decoder_layers(model)
        bad = [i for i in layer_indices if not 0 <= i < len(layers)]
        if bad or not layer_indices:
            raise UserError(f"layer indices {list(layer_indices)} must be within 0..{len(layers) - 1}")
        self.layer_indices = list(layer_indices)
        self.num_sources = len(self.layer_indices)
        self.detach = detach
        self._layers = [layers[i] for i in self.layer_indices]
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def _make_hook(self, slot: int):
        def hook(_module: nn.Module, _args: tuple, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            self._outputs[slot] = hidden.detach() if self.detach else hidden

        return hook

    @property
    def outputs(self) -> list[torch.Tensor]:
        """The captured layer outputs, (B, T, H) each, in `layer_indices` order."""
        if len(self._outputs) != self.num_sources:
            raise RuntimeError("no complete forward pass ran inside the LayerCapture context")
        return [self._outputs[slot] for slot in range(self.num_sources)]

    @property
    def sources(self) -> torch.Tensor:
        """(B, T, E, H) stacked layer outputs."""
        return torch.stack(self.outputs, dim=2)

    def __enter__(self) -> LayerCapture:
        self._outputs = {}
        self._handles = [
            layer.register_forward_hook(self._make_hook(s)) for s, layer in enumerate(self._layers)
        ]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def dense_layer_sources(model: nn.Module, num_sources: int) -> LayerCapture:
    """A capture of `num_sources` evenly spaced decoder layers' hidden states, detached: the sources of a
    dense teacher."""
    return LayerCapture(model, evenly_spaced_layers(len(decoder_layers(model)), num_sources))


def knowledge_sources(
    model: nn.Module, num_sources: int, layer_index: int | None = None, include_shared: bool = True
) -> ExpertCapture | LayerCapture:
    """The teacher's knowledge sources: its experts at `layer_index` (default middle MoE layer) for an MoE
    model, else `num_sources` evenly spaced layers. Check `.num_sources` of the result: for an MoE teacher it
    is the number of experts (plus a shared one), whatever `num_sources` says."""
    if find_moe_layers(model):
        return ExpertCapture(model, layer_index=layer_index, include_shared=include_shared)
    return dense_layer_sources(model, num_sources)
