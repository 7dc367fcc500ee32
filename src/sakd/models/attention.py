"""Attention implementation choice and attention-map capture, failing loudly where maps would be missing.

Only the eager implementation materialises attention probabilities. Under sdpa (and the flash / flex kernels)
transformers 5.x answers `output_attentions=True` with an EMPTY tuple and a log line, and an attention
module's second output is None: a loss built on them would silently see nothing. So the implementation is
chosen here from whether maps are needed, a contradictory request is an error, and every capture checks that
real maps came back.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch
from torch import nn

from sakd.errors import UserError
from sakd.models.experts import decoder_layers
from sakd.models.load import unwrap

MAP_IMPLEMENTATIONS = frozenset({"eager"})


def attention_implementation(needs_maps: bool, requested: str | None = "auto") -> str | None:
    """The `attn_implementation` to load a model with: eager when attention maps are needed, else for "auto"
    (or None) None, the model's own default (sdpa where its family supports it: Gemma 2, for one, does not and
    refuses a request for it); an explicit request is kept unless it cannot give the maps that are needed."""
    if requested in (None, "auto"):
        return "eager" if needs_maps else None
    if needs_maps and requested not in MAP_IMPLEMENTATIONS:
        raise UserError(
            f"attention maps are needed (an attention-transfer loss has a nonzero weight) but attention "
            f"implementation '{requested}' was requested: {requested} computes attention without "
            "materialising the probabilities and returns no attention maps; use 'eager' (or 'auto'), or set "
            "the attention loss weight to 0"
        )
    return requested


def current_attention_implementation(model: nn.Module) -> str | None:
    """The implementation a loaded model runs with (its config's `_attn_implementation`)."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def require_attention_maps(outputs, role: str = "model") -> tuple[torch.Tensor, ...]:
    """The attention maps of a forward pass, or a UserError when there are none.

    outputs: a model output with `.attentions`, or a sequence of maps. Returns the tuple of (B, heads, L, L)
    maps. Raises when they are None, an empty tuple (sdpa's answer to output_attentions=True), or hold None
    or empty tensors.
    """
    maps = getattr(outputs, "attentions", outputs)
    if maps is None or len(maps) == 0 or any(m is None or m.numel() == 0 for m in maps):
        raise UserError(
            f"the {role} returned no attention maps: its attention implementation does not materialise "
            "them (sdpa and flash attention return none); load it with attn_implementation='eager'"
        )
    return tuple(maps)


def _attention_module(layer: nn.Module) -> nn.Module:
    module = getattr(layer, "self_attn", None)
    if isinstance(module, nn.Module):
        return module
    for child in layer.children():
        if type(child).__name__.endswith("Attention"):
            return child
    raise UserError(f"cannot find the attention module of {type(layer).__name__} (expected `self_attn`)")


class capture_attentions:
    """Context manager: record the attention probabilities of chosen decoder layers through forward hooks.

    Cheaper than `output_attentions=True`, which keeps every layer's (B, heads, L, L) map. model must run
    with eager attention (checked on entry); layer_indices default to the last layer. After a forward,
    `maps` is the list of (B, heads, L, L) maps in `layer_indices` order (with their graph unless
    `detach`); a forward that produced no maps raises a UserError there.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_indices: Sequence[int] | None = None,
        detach: bool = False,
        role: str = "model",
    ):
        layers = decoder_layers(model)
        self.layer_indices = [len(layers) - 1] if layer_indices is None else list(layer_indices)
        if not self.layer_indices or any(not 0 <= i < len(layers) for i in self.layer_indices):
            raise UserError(
                f"attention layer indices {self.layer_indices} must be within 0..{len(layers) - 1}"
            )
        self.model = model
        self.detach = detach
        self.role = role
        self._modules = [_attention_module(layers[i]) for i in self.layer_indices]
        self._maps: dict[int, torch.Tensor | None] = {}
        self._handles: list = []

    def _make_hook(self, slot: int):
        def hook(_module: nn.Module, _args: tuple, output) -> None:
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is not None and self.detach:
                weights = weights.detach()
            self._maps[slot] = weights

        return hook

    @property
    def maps(self) -> list[torch.Tensor]:
        """(B, heads, L, L) attention probabilities per chosen layer, from the last forward."""
        if len(self._maps) != len(self._modules):
            raise RuntimeError("no forward pass ran inside the capture_attentions context")
        return list(require_attention_maps([self._maps[s] for s in range(len(self._modules))], self.role))

    def __enter__(self) -> capture_attentions:
        implementation = current_attention_implementation(self.model)
        if implementation not in MAP_IMPLEMENTATIONS:
            raise UserError(
                f"the {self.role} runs with attention implementation '{implementation}', which returns no "
                "attention maps: load it with attn_implementation='eager' to use attention-transfer losses"
            )
        self._maps = {}
        self._handles = [m.register_forward_hook(self._make_hook(s)) for s, m in enumerate(self._modules)]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
