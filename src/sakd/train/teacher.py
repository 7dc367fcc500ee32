"""The frozen teacher's forward pass: its final hidden state and, on request, what the auxiliary losses read
(knowledge sources, last-layer attention, every layer's hidden states), all captured without editing it."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from sakd.models.attention import capture_attentions
from sakd.models.load import capture_final_hidden, unwrap


@dataclass
class TeacherPass:
    hidden: torch.Tensor  # (B, Lt, Ht) final hidden state
    sources: torch.Tensor | None = None  # (B, Lt, E, Ht) knowledge sources
    attention: torch.Tensor | None = None  # (B, heads, Lt, Lt) last-layer attention
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, 0 = embeddings


@torch.no_grad()
def teacher_pass(
    teacher: nn.Module,
    batch: dict[str, torch.Tensor],
    sources=None,
    attention: bool = False,
    hidden_states: bool = False,
) -> TeacherPass:
    """The frozen teacher's forward: final hidden state, and on request knowledge sources, last-layer
    attention and every layer's hidden states, all captured without editing the model."""
    with ExitStack() as stack:
        t_out = stack.enter_context(capture_final_hidden(teacher))
        if sources is not None:
            stack.enter_context(sources)
        attn = stack.enter_context(capture_attentions(unwrap(teacher), detach=True)) if attention else None
        result = teacher(
            input_ids=batch["teacher_input_ids"],
            attention_mask=batch.get("teacher_attention_mask"),
            logits_to_keep=1,
            use_cache=False,
            output_hidden_states=hidden_states,
        )
        return TeacherPass(
            hidden=t_out["hidden"],
            sources=sources.sources if sources is not None else None,
            attention=attn.maps[0] if attn is not None else None,
            hidden_states=result.hidden_states if hidden_states else None,
        )
