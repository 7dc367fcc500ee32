"""Which KD row loss a run uses, chosen in one place from the distill settings and the two tokenizers.

A teacher reaches the loss in one of two forms, and each has its factory:
- `logit_kd`: the teacher's logits (a live teacher): same vocabulary, projection, ULD or hybrid, and the
  fused forward-KL path where it applies;
- `top_k_kd`: the teacher's top-k distribution and the mass of the rest (a teacher cache): the sparse
  divergence, same vocabulary or projected, and its fused forward-KL path.

Each returns an object that builds the chunked row loss for a temperature, so nothing else decides between
the variants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from sakd.errors import UserError
from sakd.losses.chunked import RowLoss
from sakd.losses.cross_vocab import CROSS_VOCAB_LOSSES
from sakd.losses.divergence import divergence
from sakd.losses.fused import (
    FusedCachedForwardKL,
    FusedForwardKL,
    TargetFn,
    projected_target,
    same_vocab_target,
)
from sakd.losses.rows import make_cached_distill_row_loss, make_distill_row_loss
from sakd.losses.sparse import sparse_teacher_divergence
from sakd.losses.vocab_mapping import VocabMapping, build_vocab_mapping
from sakd.models.head import ModelHead


@dataclass(frozen=True)
class KDSettings:
    """The distill settings that choose the KD loss (`sakd.config.DistillConfig` has them all)."""

    divergence: str = "forward_kl"
    parameter: float = 0.5  # jsd's beta, the skew divergences' alpha
    cross_vocab: str = "projection"
    fused: bool = True

    @staticmethod
    def of(distill: Any) -> KDSettings:
        return KDSettings(
            distill.divergence, distill.divergence_parameter, distill.cross_vocab, distill.fused_loss
        )

    @property
    def fused_forward_kl(self) -> bool:
        return self.fused and self.divergence == "forward_kl"


def same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> bool:
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


@dataclass(frozen=True)
class LogitKD:
    """KD against teacher logits: `per_row(student_logits (n, V_s), teacher_logits (n, V_t), temperature=T)`
    gives (n,) fp32."""

    kind: str
    per_row: Callable[..., torch.Tensor]
    mapping: VocabMapping | None = None
    fused_target: Callable[[int], TargetFn] | None = field(default=None, repr=False)

    def at(self, temperature: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return partial(self.per_row, temperature=temperature)

    def row_loss(self, temperature: float, teacher_head: ModelHead, student_width: int) -> RowLoss:
        """The chunked row loss with row inputs (labels, teacher hidden, kd_mask, kd_weight)."""
        row_loss = make_distill_row_loss(self.at(temperature), teacher_head)
        if self.fused_target is None:
            return row_loss
        return FusedForwardKL(row_loss, self.fused_target(student_width), teacher_head, None, temperature)


def logit_kd(settings: KDSettings, teacher_tokenizer: Any, student_tokenizer: Any) -> LogitKD:
    name, parameter = settings.divergence, settings.parameter
    if same_vocabulary(teacher_tokenizer, student_tokenizer):
        vocab = len(student_tokenizer)
        fused = (lambda _width: same_vocab_target(vocab)) if settings.fused_forward_kl else None
        return LogitKD(
            f"same-vocabulary {name}", partial(_same_vocab_kd, vocab, name, parameter), fused_target=fused
        )
    mapping = build_vocab_mapping(teacher_tokenizer, student_tokenizer)
    kwargs: dict[str, Any] = {"mapping": mapping}
    if settings.cross_vocab != "uld":
        kwargs.update(divergence=name, beta=parameter)
    fused = None
    if settings.fused_forward_kl and settings.cross_vocab == "projection":
        fused = partial(projected_target, mapping)
    return LogitKD(
        f"cross-vocabulary {settings.cross_vocab}",
        partial(CROSS_VOCAB_LOSSES[settings.cross_vocab], **kwargs),
        mapping,
        fused,
    )


def _same_vocab_kd(
    vocab: int, name: str, beta: float, s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Both logit widths may be padded beyond the tokenizer's size: compare over the real vocabulary."""
    t_logprobs = torch.log_softmax(t_logits[:, :vocab].float() / temperature, dim=-1)
    return divergence(name, s_logits[:, :vocab], t_logprobs, temperature, beta=beta)


@dataclass(frozen=True)
class TopKKD:
    """KD against a top-k teacher: `per_row(student_logits, ids (n, k), probs (n, k), tail (n,),
    temperature=T)` gives (n,) fp32 (`sparse_teacher_divergence`)."""

    kind: str
    per_row: Callable[..., torch.Tensor]
    mapping: VocabMapping | None = None
    fused: dict[str, Any] | None = None  # FusedCachedForwardKL's arguments, when it applies

    def at(self, temperature: float) -> Callable[..., torch.Tensor]:
        return partial(self.per_row, temperature=temperature)

    def row_loss(self, temperature: float) -> RowLoss:
        """The chunked row loss with row inputs (labels, ids, probs, tail, kd_mask, kd_weight)."""
        row_loss = make_cached_distill_row_loss(self.at(temperature))
        if self.fused is None:
            return row_loss
        return FusedCachedForwardKL(row_loss, temperature, **self.fused)


def top_k_kd(settings: KDSettings, teacher_tokenizer: Any, student_tokenizer: Any) -> TopKKD:
    name = settings.divergence
    sparse = partial(
        sparse_teacher_divergence,
        name=name,
        beta=settings.parameter,
        teacher_vocab_size=len(teacher_tokenizer),
    )
    fused = {"teacher_vocab_size": len(teacher_tokenizer)} if settings.fused_forward_kl else None
    if same_vocabulary(teacher_tokenizer, student_tokenizer):
        vocab = len(student_tokenizer)
        if fused is not None:
            fused["student_vocab"] = vocab
        return TopKKD(
            f"same-vocabulary {name} (cached top-k teacher)",
            partial(sparse, student_vocab=vocab),
            None,
            fused,
        )
    if settings.cross_vocab != "projection":
        raise UserError(
            f"a cached teacher supports the cross-vocabulary projection only (its top-k cannot be sorted "
            f"for {settings.cross_vocab}): set distill.cross_vocab=projection, or drop teacher.cache"
        )
    if name == "reverse_kl" or (name == "jsd" and settings.parameter == 1.0):
        raise UserError(
            "reverse KL against a projected teacher is infinite: use forward_kl, jsd with beta < 1, or tvd"
        )
    mapping = build_vocab_mapping(teacher_tokenizer, student_tokenizer)
    if fused is not None:
        fused["teacher_to_student"] = mapping.teacher_to_student
    return TopKKD(
        f"cross-vocabulary projection {name} (cached top-k teacher)",
        partial(sparse, teacher_to_student=mapping.teacher_to_student),
        mapping,
        fused,
    )
