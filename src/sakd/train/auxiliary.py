"""The auxiliary part of the distillation objective: the trainable heads beside the student, and the losses on
aligned groups that use them (feature, attention, layer-wise, contrastive, router and balance, KD token
weights). Which of them run, and with which weights, comes from the curriculum point of the current step.

With a teacher cache only the KD token weights remain: their knowledge gap is the cached sparse divergence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sakd.curriculum import CurriculumPoint
from sakd.losses.auxiliary import (
    attention_transfer_loss,
    contrastive_loss,
    default_layer_map,
    feature_loss,
    group_mean,
    layer_projections,
    layerwise_loss,
    pooled_groups,
)
from sakd.models.experts import knowledge_sources
from sakd.models.head import head_logits, model_head
from sakd.models.load import unwrap
from sakd.router import StudentAwareRouter, blend_token_weights, knowledge_gap

if TYPE_CHECKING:
    from sakd.train.rows import TokenCounts
    from sakd.train.teacher import TeacherPass


class DistillHeads(nn.Module):
    """Trainable modules beside the student: the router and the projections of the auxiliary losses."""

    def __init__(
        self,
        student_hidden: int,
        teacher_hidden: int,
        num_sources: int,
        layer_map: list[tuple[int, int]],
        router_dim: int = 128,
        min_weight: float = 0.25,
        max_weight: float = 4.0,
    ):
        super().__init__()
        self.layer_map = [tuple(p) for p in layer_map]
        self.router = StudentAwareRouter(
            student_hidden,
            teacher_hidden,
            num_sources,
            router_dim,
            min_weight=min_weight,
            max_weight=max_weight,
        )
        self.feature = nn.Linear(student_hidden, teacher_hidden)
        self.layerwise = layer_projections(self.layer_map, student_hidden, teacher_hidden)
        self.contrastive = nn.Linear(student_hidden, teacher_hidden)


def build_heads(student: nn.Module, teacher: nn.Module, router_cfg, layer_map, layerwise_pairs: int):
    """The heads and the teacher's knowledge-source capture (experts of an MoE layer, or spaced layers)."""
    s_cfg, t_cfg = unwrap(student).config, unwrap(teacher).config
    sources = knowledge_sources(
        unwrap(teacher), router_cfg.num_sources, router_cfg.moe_layer, router_cfg.include_shared_expert
    )
    if layer_map is None:
        pairs = min(layerwise_pairs, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
        layer_map = default_layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, pairs)
    heads = DistillHeads(
        s_cfg.hidden_size,
        t_cfg.hidden_size,
        sources.num_sources,
        layer_map,
        router_cfg.dim,
        router_cfg.min_weight,
        router_cfg.max_weight,
    )
    return heads, sources


@dataclass(frozen=True)
class AuxNeeds:
    """What the auxiliary losses of one micro-batch need (all False: none run)."""

    attention: bool = False  # both models' last-layer attention
    layers: bool = False  # both models' per-layer hidden states
    sources: bool = False  # the teacher's knowledge sources (router, balance)
    token_weights: bool = False  # the router's KD token weights
    groups: bool = False  # hidden states pooled over aligned groups

    @staticmethod
    def at(weights: dict[str, float], use_kd: bool) -> AuxNeeds:
        sources = weights["router"] > 0 or weights["balance"] > 0
        token_weights = use_kd and weights["token_weighting"] > 0
        return AuxNeeds(
            attention=weights["attention"] > 0,
            layers=weights["layerwise"] > 0,
            sources=sources,
            token_weights=token_weights,
            groups=sources or token_weights or weights["feature"] > 0 or weights["contrastive"] > 0,
        )

    @property
    def teacher(self) -> bool:
        """Whether a live teacher has to run for these needs even without KD."""
        return self.groups or self.attention or self.layers


class AuxiliaryLosses:
    """The auxiliary losses of `DistillObjective`. `kd_fn(temperature)` is the objective's per-row KD (the
    router's knowledge gap), `rows_per_chunk(*heads)` its chunk bound; `cached`: the teacher is a cache."""

    def __init__(
        self,
        heads: DistillHeads,
        sources: Any,
        attention_loss: str,
        contrastive_temperature: float,
        kd_fn: Callable[[float], Callable[..., torch.Tensor] | None],
        rows_per_chunk: Callable[..., int],
        cached: bool,
    ):
        self.heads = heads
        self.sources = sources
        self.attention_loss = attention_loss
        self.contrastive_temperature = contrastive_temperature
        self.kd_fn = kd_fn
        self.rows_per_chunk = rows_per_chunk
        self.cached = cached

    def __call__(
        self,
        needs: AuxNeeds,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: dict[str, torch.Tensor],
        hidden: torch.Tensor,
        s_attn: Any,
        s_result: Any,
        t_pass: TeacherPass | None,
        point: CurriculumPoint,
        counts: TokenCounts,
        scale: float,
        micro_batches: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(weighted sum of the auxiliary losses, {part: unweighted loss}, KD token weights per aligned group in
        (b, g) order or None). Token-level parts are divided by the step's global KD count (times `scale`);
        batch-level ones (balance, contrastive) are means divided by `micro_batches`. `s_attn` and `s_result`
        are the student's captured attention and model output, `hidden` its final hidden state (B, Ls, H)."""
        w = point.weights
        extra = hidden.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        group_weights = None
        if needs.groups:
            mask = batch["align_mask"]  # (B, G)
            num_groups = mask.shape[1]
            s_groups, _ = group_mean(hidden, batch["student_group"], num_groups)  # (B, G, Hs)
            if w["feature"] > 0 or w["contrastive"] > 0:
                t_groups, _ = group_mean(t_pass.hidden, batch["teacher_group"], num_groups)  # (B, G, Ht)
            if (needs.sources or needs.token_weights) and self.cached:
                gap = self._cached_knowledge_gap(student, batch, hidden, point)
            elif needs.sources or needs.token_weights:
                gap = self._knowledge_gap(student, teacher, batch, hidden, t_pass, point)
            if needs.sources:
                routed = self._route(batch, t_pass, s_groups, gap, point, counts)
                token_weights, parts["capacity"] = routed.token_weights, routed.capacity_loss
                parts["router"] = routed.feature_loss
                parts["balance"] = routed.balance_loss / micro_batches
                extra = extra + scale * w["router"] * routed.feature_loss + w["balance"] * parts["balance"]
            elif needs.token_weights:
                token_weights, parts["capacity"] = self.heads.router.token_weights(
                    s_groups[mask], gap, count=counts.kd
                )
            if needs.token_weights:
                group_weights = blend_token_weights(token_weights, w["token_weighting"])
                extra = extra + scale * w["token_weighting"] * parts["capacity"]
            if w["feature"] > 0:
                parts["feature"] = feature_loss(
                    s_groups[mask], t_groups[mask], self.heads.feature, count=counts.kd
                )
                extra = extra + scale * w["feature"] * parts["feature"]
            if w["contrastive"] > 0:
                s_pooled, valid = pooled_groups(s_groups, mask)
                t_pooled, _ = pooled_groups(t_groups, mask)
                c = contrastive_loss(
                    self.heads.contrastive(s_pooled), t_pooled, self.contrastive_temperature, valid
                )
                parts["contrastive"] = c / micro_batches
                extra = extra + w["contrastive"] * parts["contrastive"]
        if needs.attention:
            parts["attention"] = attention_transfer_loss(
                s_attn.maps[0],
                t_pass.attention,
                batch["student_group"],
                batch["teacher_group"],
                batch["align_mask"].shape[1],
                batch["align_mask"],
                self.attention_loss,
                count=counts.kd,
            )
            extra = extra + scale * w["attention"] * parts["attention"]
        if needs.layers:
            parts["layerwise"] = layerwise_loss(
                s_result.hidden_states,
                t_pass.hidden_states,
                self.heads.layer_map,
                self.heads.layerwise,
                batch["student_group"],
                batch["teacher_group"],
                batch["align_mask"],
                count=counts.kd,
            )
            extra = extra + scale * w["layerwise"] * parts["layerwise"]
        return extra, parts, group_weights

    def _knowledge_gap(self, student, teacher, batch, hidden, t_pass, point) -> torch.Tensor:
        """The detached per-group divergence between teacher and student predictions (N,)."""
        mask = batch["align_mask"]
        bi = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        s_head, t_head = model_head(student), model_head(teacher)
        return knowledge_gap(
            hidden[bi, batch["align_student_pos"][mask]].detach(),
            t_pass.hidden[bi, batch["align_teacher_pos"][mask]],
            s_head.detach(),
            t_head,
            self.kd_fn(point.temperature),
            self.rows_per_chunk(s_head, t_head),
        )

    @torch.no_grad()
    def _cached_knowledge_gap(self, student, batch, hidden, point) -> torch.Tensor:
        """`_knowledge_gap` against the cached teacher: the sparse KD per aligned group (N,), detached."""
        mask = batch["align_mask"]
        bi = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        s_rows = hidden[bi, batch["align_student_pos"][mask]].detach()  # (N, Hs)
        teacher = [batch[k][mask] for k in ("cache_ids", "cache_probs", "cache_tail")]
        head, kd = model_head(student), self.kd_fn(point.temperature)
        gaps = []
        step = self.rows_per_chunk(head)
        for start in range(0, s_rows.shape[0], step):
            stop = start + step
            logits = head_logits(s_rows[start:stop].to(head.weight.dtype), head)
            gaps.append(kd(logits, *(t[start:stop] for t in teacher)).float())
        return torch.cat(gaps) if gaps else hidden.new_zeros(0, dtype=torch.float32)

    def _route(self, batch, t_pass, s_groups, gap, point, counts):
        """The router on aligned groups: routed-knowledge feature loss, balance, token weights."""
        mask = batch["align_mask"]
        src_groups, _ = group_mean(t_pass.sources, batch["teacher_group"], mask.shape[1])  # (B, G, E, Ht)
        return self.heads.router(
            s_groups[mask],
            src_groups[mask],
            gap,
            top_k=point.top_k,
            temperature=point.router_temperature,
            count=counts.kd,
        )
