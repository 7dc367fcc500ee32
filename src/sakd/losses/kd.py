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
from sakd.losses.sparse import SparseTeacherSettings, sparse_teacher_divergence
from sakd.losses.vocab_mapping import VocabMapping, build_vocab_mapping
from sakd.models.head import ModelHead


@dataclass(frozen=True)
class KDSettings:
    """The distill settings that choose the KD loss (`sakd.config.DistillConfig` has them all)."""

    divergence: str = "forward_kl"
    parameter: float = 0.5  # jsd's beta, the skew divergences' alpha, akl's mu, taid's t at the start
    cross_vocab: str = "projection"
    fused: bool = True
    parameter_end: float | None = None  # the parameter at the end of training (taid's t), linear in between
    # projection: KD only where the data's next tokens agree (`distill.projection_rows`)
    consistent_rows: bool = False

    @staticmethod
    def of(distill: Any) -> KDSettings:
        end = distill.taid_t_end if distill.divergence == "taid" else None
        consistent = distill.projection_rows == "consistent"
        return KDSettings(
            distill.divergence,
            distill.divergence_parameter,
            distill.cross_vocab,
            distill.fused_loss,
            end,
            consistent,
        )

    def parameter_at(self, progress: float) -> float:
        """The divergence's parameter at `progress` in [0, 1] of training."""
        if self.parameter_end is None:
            return self.parameter
        return self.parameter + (self.parameter_end - self.parameter) * progress

    @property
    def fused_forward_kl(self) -> bool:
        return self.fused and self.divergence == "forward_kl"

    @property
    def fused_logits(self) -> bool:
        """Whether a live teacher's KD takes the closed-form gradient path: forward KL, and JSD short of its
        reverse-KL end."""
        return self.fused_forward_kl or (self.fused and self.divergence == "jsd" and self.parameter < 1.0)

    @property
    def fused_jsd_beta(self) -> float | None:
        """The fused path's JSD beta (None: forward KL, which JSD at beta 0 is)."""
        return self.parameter if self.divergence == "jsd" and self.parameter > 0.0 else None


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
    settings: KDSettings | None = None  # None: the divergence takes no parameter (ULD)

    def at(
        self, temperature: float, progress: float = 0.0
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The per-row KD at `temperature`, with the divergence's parameter at `progress` of training."""
        if self.settings is None:
            return partial(self.per_row, temperature=temperature)
        return partial(self.per_row, temperature=temperature, beta=self.settings.parameter_at(progress))

    def row_loss(
        self, temperature: float, teacher_head: ModelHead, student_width: int, progress: float = 0.0
    ) -> RowLoss:
        """The chunked row loss with row inputs (labels, teacher hidden, kd_mask, kd_weight)."""
        row_loss = make_distill_row_loss(self.at(temperature, progress), teacher_head)
        if self.fused_target is None:
            return row_loss
        target = self.fused_target(student_width)
        beta = self.settings.fused_jsd_beta if self.settings is not None else None
        return FusedForwardKL(row_loss, target, teacher_head, None, temperature, beta)


def logit_kd(settings: KDSettings, teacher_tokenizer: Any, student_tokenizer: Any) -> LogitKD:
    name = settings.divergence
    if same_vocabulary(teacher_tokenizer, student_tokenizer):
        vocab = len(student_tokenizer)
        fused = (lambda _width: same_vocab_target(vocab)) if settings.fused_logits else None
        return LogitKD(
            f"same-vocabulary {name}",
            partial(_same_vocab_kd, vocab, name),
            fused_target=fused,
            settings=settings,
        )
    _check_cross_vocab(settings)
    mapping = build_vocab_mapping(teacher_tokenizer, student_tokenizer)
    uld = settings.cross_vocab == "uld"
    fused = None
    if settings.fused_logits and settings.cross_vocab == "projection":
        fused = partial(projected_target, mapping)
    return LogitKD(
        f"cross-vocabulary {settings.cross_vocab}" + ("" if uld or name == "forward_kl" else f" {name}"),
        partial(
            CROSS_VOCAB_LOSSES[settings.cross_vocab], mapping=mapping, **({} if uld else {"divergence": name})
        ),
        mapping,
        fused,
        None if uld else settings,
    )


def _check_cross_vocab(settings: KDSettings) -> None:
    """Divergences that have no meaning on a projected (or restricted) teacher distribution."""
    if settings.divergence == "akl":
        raise UserError(
            "distill.divergence=akl needs one vocabulary: its reverse-KL part is infinite against a projected "
            "teacher; use forward_kl, skew_kl or taid across tokenizers"
        )
    if settings.cross_vocab == "hybrid" and settings.divergence == "taid":
        raise UserError(
            "distill.divergence=taid does not apply to distill.cross_vocab=hybrid: use projection"
        )


def _same_vocab_kd(
    vocab: int,
    name: str,
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    temperature: float,
    beta: float = 0.5,
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
    settings: KDSettings
    mapping: VocabMapping | None = None
    fused: SparseTeacherSettings | None = None  # the settings of FusedCachedForwardKL, when it applies

    def at(self, temperature: float, progress: float = 0.0) -> Callable[..., torch.Tensor]:
        """The per-row KD at `temperature`, with the divergence's parameter at `progress` of training."""
        return partial(self.per_row, temperature=temperature, beta=self.settings.parameter_at(progress))

    def row_loss(self, temperature: float, progress: float = 0.0) -> RowLoss:
        """The chunked row loss with row inputs (labels, ids, probs, tail, kd_mask, kd_weight)."""
        row_loss = make_cached_distill_row_loss(self.at(temperature, progress))
        if self.fused is None:
            return row_loss
        return FusedCachedForwardKL(row_loss, temperature, self.fused)


def top_k_kd(settings: KDSettings, teacher_tokenizer: Any, student_tokenizer: Any) -> TopKKD:
    name, teacher_vocab = settings.divergence, len(teacher_tokenizer)
    if same_vocabulary(teacher_tokenizer, student_tokenizer):
        sparse = SparseTeacherSettings(teacher_vocab, name, student_vocab=len(student_tokenizer))
        return TopKKD(
            f"same-vocabulary {name} (cached top-k teacher)",
            partial(sparse_teacher_divergence, settings=sparse),
            settings,
            None,
            sparse if settings.fused_forward_kl else None,
        )
    if settings.cross_vocab != "projection":
        raise UserError(
            f"a cached teacher supports the cross-vocabulary projection only (its top-k cannot be sorted "
            f"for {settings.cross_vocab}): set distill.cross_vocab=projection, or drop teacher.cache"
        )
    _check_cross_vocab(settings)
    if name == "reverse_kl" or (name == "jsd" and settings.parameter == 1.0):
        raise UserError(
            "reverse KL against a projected teacher is infinite: use forward_kl, jsd with beta < 1, or tvd"
        )
    mapping = build_vocab_mapping(teacher_tokenizer, student_tokenizer)
    sparse = SparseTeacherSettings(teacher_vocab, name, teacher_to_student=mapping.teacher_to_student)
    return TopKKD(
        f"cross-vocabulary projection {name} (cached top-k teacher)",
        partial(sparse_teacher_divergence, settings=sparse),
        settings,
        mapping,
        sparse if settings.fused_forward_kl else None,
    )
