"""The auxiliary part of the distillation objective: the trainable heads beside the student, and the losses on
aligned groups that use them (feature, attention, layer-wise, contrastive, router and balance, KD token
weights). Which of them run, and with which weights, comes from the curriculum point of the current step.

The router and the KD token weights read the teacher's knowledge gap from the `Teacher` itself, so they work
with a teacher cache as well; the other parts need the live teacher's hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sakd.curriculum import CurriculumPoint
from sakd.data.batch import Batch
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
from sakd.losses.chunked import Chunking
from sakd.models.experts import knowledge_sources
from sakd.models.head import ModelHead
from sakd.models.load import unwrap
from sakd.router import StudentAwareRouter, blend_token_weights
from sakd.train.rows import LossNorm
from sakd.train.teacher import Teacher, TeacherPass, aligned_rows


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


@dataclass
class StudentPass:
    """The student's forward on one micro-batch, as the losses read it."""

    hidden: torch.Tensor  # (B, Ls, H) final hidden state
    head: ModelHead  # its LM head
    attention: torch.Tensor | None = None  # (B, heads, Ls, Ls) last-layer attention, when asked for
    hidden_states: tuple[torch.Tensor, ...] | None = None  # per layer, 0 = embeddings, when asked for


class AuxiliaryLosses:
    """The auxiliary losses of `DistillObjective`, against its `teacher` (whose knowledge gap the router and
    the KD token weights read); `chunking` bounds the rows of the gap's logits."""

    def __init__(
        self,
        heads: DistillHeads,
        sources: Any,
        teacher: Teacher,
        chunking: Chunking,
        attention_loss: str = "kl",
        contrastive_temperature: float = 0.1,
    ):
        self.heads = heads
        self.sources = sources
        self.teacher = teacher
        self.chunking = chunking
        self.attention_loss = attention_loss
        self.contrastive_temperature = contrastive_temperature

    def __call__(
        self,
        needs: AuxNeeds,
        batch: Batch,
        student: StudentPass,
        t_pass: TeacherPass | None,
        point: CurriculumPoint,
        norm: LossNorm,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """(weighted sum of the auxiliary losses, {part: unweighted loss}, KD token weights per aligned group in
        (b, g) order or None). Token-level parts are divided by the step's global KD count (times the number
        of processes); batch-level ones (balance, contrastive) are means divided by the micro-batches."""
        extra = student.hidden.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        group_weights = None
        if needs.groups:
            extra, group_weights = self._group_losses(needs, batch, student, t_pass, point, norm, parts)
        w, scale, count = point.weights, norm.processes, norm.counts.kd
        if needs.attention:
            parts["attention"] = attention_transfer_loss(
                student.attention,
                t_pass.attention,
                batch.student.group,
                batch.teacher.group,
                batch.alignment.mask.shape[1],
                batch.alignment.mask,
                self.attention_loss,
                count=count,
            )
            extra = extra + scale * w["attention"] * parts["attention"]
        if needs.layers:
            parts["layerwise"] = layerwise_loss(
                student.hidden_states,
                t_pass.hidden_states,
                self.heads.layer_map,
                self.heads.layerwise,
                batch.student.group,
                batch.teacher.group,
                batch.alignment.mask,
                count=count,
            )
            extra = extra + scale * w["layerwise"] * parts["layerwise"]
        return extra, parts, group_weights

    def _group_losses(self, needs, batch, student, t_pass, point, norm, parts):
        """The losses on hidden states pooled over aligned groups: router, balance, token weights, feature,
        contrastive. Adds their parts to `parts`; returns (their weighted sum, the KD token weights or None)."""
        w, scale, count = point.weights, norm.processes, norm.counts.kd
        extra = student.hidden.new_zeros((), dtype=torch.float32)
        mask = batch.alignment.mask  # (B, G)
        s_groups, _ = group_mean(student.hidden, batch.student.group, mask.shape[1])  # (B, G, Hs)
        if w["feature"] > 0 or w["contrastive"] > 0:
            t_groups, _ = group_mean(t_pass.hidden, batch.teacher.group, mask.shape[1])  # (B, G, Ht)
        token_weights = None
        if needs.sources or needs.token_weights:
            bi, positions = aligned_rows(batch, "student")
            s_rows = student.hidden[bi, positions].detach()
            gap = self.teacher.knowledge_gap(s_rows, student.head, batch, t_pass, point, self.chunking)
        if needs.sources:
            routed = self._route(batch, t_pass, s_groups, gap, point, count)
            token_weights, parts["capacity"] = routed.token_weights, routed.capacity_loss
            parts["router"] = routed.feature_loss
            parts["balance"] = routed.balance_loss / norm.micro_batches
            extra = extra + scale * w["router"] * routed.feature_loss + w["balance"] * parts["balance"]
        elif needs.token_weights:
            token_weights, parts["capacity"] = self.heads.router.token_weights(
                s_groups[mask], gap, count=count
            )
        group_weights = None
        if needs.token_weights:
            group_weights = blend_token_weights(token_weights, w["token_weighting"])
            extra = extra + scale * w["token_weighting"] * parts["capacity"]
        if w["feature"] > 0:
            parts["feature"] = feature_loss(s_groups[mask], t_groups[mask], self.heads.feature, count=count)
            extra = extra + scale * w["feature"] * parts["feature"]
        if w["contrastive"] > 0:
            s_pooled, valid = pooled_groups(s_groups, mask)
            t_pooled, _ = pooled_groups(t_groups, mask)
            c = contrastive_loss(
                self.heads.contrastive(s_pooled), t_pooled, self.contrastive_temperature, valid
            )
            parts["contrastive"] = c / norm.micro_batches
            extra = extra + w["contrastive"] * parts["contrastive"]
        return extra, group_weights

    def _route(self, batch, t_pass, s_groups, gap, point, count):
        """The router on aligned groups: routed-knowledge feature loss, balance, token weights."""
        mask = batch.alignment.mask
        src_groups, _ = group_mean(t_pass.sources, batch.teacher.group, mask.shape[1])  # (B, G, E, Ht)
        return self.heads.router(
            s_groups[mask],
            src_groups[mask],
            gap,
            top_k=point.top_k,
            temperature=point.router_temperature,
            count=count,
        )
