"""The LM head exactly as the model applies it: the linear layer and what the model's forward does to its
output before returning the logits (a scale, a soft-cap), and a start-up check that the two agree.

sakd computes logits from the final hidden state itself, chunk by chunk; a model whose forward transforms the
logits after the linear layer would otherwise get different logits in sakd than in `model(...).logits`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from sakd.errors import UserError
from sakd.models.load import capture_final_hidden, lm_head, unwrap

log = logging.getLogger("sakd")

# Families whose forward scales the logits: model_type prefix -> (config field, whether forward divides by it).
_SCALE_FIELDS = {
    "cohere": ("logit_scale", False),  # logits * logit_scale
    "granite": ("logits_scaling", True),  # logits / logits_scaling
    "hyperclovax": ("logits_scaling", False),  # logits * logits_scaling
    "falcon_h1": ("lm_head_multiplier", False),  # logits * lm_head_multiplier
}
# Config fields of a final soft-cap: logits = cap * tanh(logits / cap), applied after the scale.
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")


@dataclass(frozen=True)
class LogitTransform:
    """What the model does to the linear head's output z: s = scale * z, then cap * tanh(s / cap) if capped."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from the linear output (fp32); in place unless autograd records the logits."""
        if self.identity:
            return logits
        if torch.is_grad_enabled() and logits.requires_grad:
            out = logits * self.scale if self.scale != 1.0 else logits
            return out if self.softcap is None else torch.tanh(out / self.softcap) * self.softcap
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    @torch.no_grad()
    def chain_(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """d/dz from d/d(logits) `grad` (n, V), in place; `logits` (n, V) are the transformed logits, and are
        overwritten when soft-capped: d cap tanh(scale z / cap) / dz = scale (1 - (logits / cap)^2)."""
        if self.softcap is not None:
            slope = logits.detach().div_(self.softcap).square_().neg_().add_(1.0)
            return grad.mul_(slope).mul_(self.scale) if self.scale != 1.0 else grad.mul_(slope)
        return grad.mul_(self.scale) if self.scale != 1.0 else grad

    def describe(self) -> str:
        steps = [f"x {self.scale:g}"] if self.scale != 1.0 else []
        if self.softcap is not None:
            steps.append(f"soft-cap {self.softcap:g}")
        return ", ".join(steps) if steps else "none"


@dataclass
class ModelHead:
    """An LM head: weight (V, H), bias (V,) or None (the model's own parameters, possibly tied to the input
    embedding) and the transform its forward applies to the logits."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = field(default_factory=LogitTransform)

    def detach(self) -> ModelHead:
        bias = None if self.bias is None else self.bias.detach()
        return ModelHead(self.weight.detach(), bias, self.transform)


def as_head(head: ModelHead | torch.Tensor, bias: torch.Tensor | None = None) -> ModelHead:
    """`head` itself, or a bare weight (V, H) (with `bias`) as a head without a transform."""
    if isinstance(head, ModelHead):
        if bias is not None:
            raise ValueError("a ModelHead carries its own bias")
        return head
    return ModelHead(head, bias)


def head_logits(hidden: torch.Tensor, head: ModelHead, out: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits fp32 (n, V) for hidden (n, H): the linear head in the weight's dtype (written to
    `out`, an (n, V) tensor of that dtype, if given), upcast, then the model's transform."""
    if head.bias is None:
        logits = torch.mm(hidden, head.weight.T, out=out)
    else:
        logits = torch.addmm(head.bias, hidden, head.weight.T, out=out)
    return head.transform.apply(logits.float())


def _number(config, name: str) -> float | None:
    value = getattr(config, name, None)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def logit_transform(model: nn.Module) -> LogitTransform:
    """The transform `model`'s forward applies after its linear head, read from its (text) config."""
    config = unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = str(getattr(text, "model_type", ""))
    scale = 1.0
    for prefix, (name, divides) in _SCALE_FIELDS.items():
        value = _number(text, name)
        if model_type.startswith(prefix) and value is not None:
            scale = 1.0 / value if divides else value
    caps = [_number(text, name) for name in _SOFTCAP_FIELDS]
    softcap = next((c for c in caps if c is not None and c > 0), None)
    return LogitTransform(scale, softcap)


def model_head(model: nn.Module) -> ModelHead:
    """The LM head of `model` (a causal LM, possibly wrapped) as its forward applies it."""
    inner = unwrap(model)
    linear = lm_head(inner)
    return ModelHead(linear.weight, linear.bias, logit_transform(inner))


def _tolerance(dtype: torch.dtype, largest: float) -> float:
    """What two computations of the same logits may differ by: rounding of the head's matmul (whose order
    differs between kernels) and of the transform, relative to the largest logit."""
    relative = 1e-4 if dtype == torch.float32 else 3e-2
    return relative * (1.0 + largest)


@torch.no_grad()
def check_head(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    role: str,
    rows: int = 2,
    tokens: int = 32,
) -> ModelHead:
    """Run the model's own forward on a probe (the first `rows` x `tokens` of a real batch) and compare its
    logits with sakd's head applied to the final hidden state; a mismatch is a UserError, never a silent run.
    Every process of a sharded model must call it (the forward is collective). Returns the head."""
    inner = unwrap(model)
    ids = input_ids[:rows, :tokens]
    mask = None if attention_mask is None else attention_mask[:rows, :tokens]
    was_training = inner.training
    inner.eval()
    try:
        with capture_final_hidden(model) as out:
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        hidden = out["hidden"]
        head = model_head(inner)  # after the forward: a sharded model's head is whole only then
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        ours = head_logits(hidden[real].to(head.weight.dtype), head)  # (n, V)
        expected = expected[real]
    finally:
        inner.train(was_training)
    name = type(inner).__name__
    if ours.shape != expected.shape:
        raise UserError(
            f"the {role}'s ({name}) logits have {expected.shape[-1]} columns but its LM head has "
            f"{ours.shape[-1]}: sakd cannot reproduce this model's output layer"
        )
    diff = float((ours - expected).abs().max()) if expected.numel() else 0.0
    # Under mixed precision both heads run in autocast's 16 bits (the caller enters it, as training does,
    # and an Accelerate-prepared model enters it in its forward anyway): compare at that precision, or a
    # plain model would fail on rounding alone.
    device_type = ids.device.type
    precision = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else head.weight.dtype
    )
    tolerance = _tolerance(precision, float(expected.abs().max()) if expected.numel() else 0.0)
    if not diff <= tolerance:  # (a NaN fails too)
        raise UserError(
            f"the {role}'s ({name}) logits differ from sakd's head by {diff:.3g} (tolerance {tolerance:.3g}): "
            f"its forward transforms the logits in a way sakd does not reproduce (sakd applies: "
            f"{head.transform.describe()}); distilling it would use wrong logits"
        )
    log.info(
        "%s head check passed (%s, logit transform: %s, max difference %.2g)",
        role,
        name,
        head.transform.describe(),
        diff,
    )
    return head
