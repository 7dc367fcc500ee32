"""Teacher-student agreement on aligned positions: top-1 agreement, top-k overlap and KL(teacher || student).

Positions are the alignment groups of windows built with both tokenizers (`align_*` batch keys): the last
student and the last teacher token of a group both predict the text that starts at the same character.
- Same vocabulary: both distributions over the tokenizer's ids (logit columns beyond it are padding), exact
  KL, and top-k sets of both models.
- Different vocabularies: the teacher's distribution projected onto the student vocabulary with the training
  loss's vocabulary mapping (`projected_teacher_probs`); top-1 agreement is the student's argmax equal to the
  projected teacher's argmax. Positions where the teacher puts all its mass on unmappable tokens (a special
  token) have no projected distribution and are counted apart, not scored.
Logits come from the final hidden states chunk by chunk (`chunked_head_loss`), never for a whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sakd.data.batch import Batch
from sakd.losses import VocabMapping, chunked_head_loss, projected_teacher_probs
from sakd.losses.divergence import forward_kl_logprobs
from sakd.models.head import ModelHead, head_logits, model_head
from sakd.models.load import capture_final_hidden

EXACT_KL = "exact (same vocabulary)"
PROJECTED_KL = "teacher projected onto the student vocabulary"


def agreement_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mapping: VocabMapping | None = None,
    vocab_size: int | None = None,
    top_k: int = 5,
) -> dict[str, torch.Tensor]:
    """Per-row agreement of aligned logits (N, V_s_model), (N, V_t_model), at temperature 1.

    Returns (N,) tensors: `top1` (1.0 where the argmaxes agree), `overlap` (|top-k(student) & top-k(teacher)|
    / k; teacher tokens with zero projected probability never count), `kl` (KL(teacher || student)), and
    `scored` (False where a projected teacher has no mass; the other values are 0 there).
    Same vocabulary when `mapping` is None: `vocab_size` (default: the narrower logits) columns are compared.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if mapping is None:
        vocab = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1])
        student_logprobs = torch.log_softmax(student_logits[:, :vocab], dim=-1)
        teacher_logprobs = torch.log_softmax(teacher_logits[:, :vocab], dim=-1)
        teacher_probs = teacher_logprobs.exp()
    else:
        student_logprobs = torch.log_softmax(student_logits, dim=-1)
        teacher_probs = projected_teacher_probs(teacher_logits, mapping, 1.0, student_logits.shape[-1])
        teacher_logprobs = teacher_probs.log()
    scored = teacher_probs.sum(-1) > 0  # (N,)
    k = min(top_k, student_logprobs.shape[-1])
    student_top = student_logprobs.topk(k, dim=-1).indices  # (N, k)
    teacher_top = teacher_probs.topk(k, dim=-1)
    hits = (student_top[:, :, None] == teacher_top.indices[:, None, :]) & (teacher_top.values[:, None, :] > 0)
    top1 = (student_top[:, 0] == teacher_top.indices[:, 0]).float()
    kl = forward_kl_logprobs(student_logprobs, teacher_logprobs)
    zero = torch.zeros_like(kl)
    return {
        "top1": torch.where(scored, top1, zero),
        "overlap": torch.where(scored, hits.any(-1).sum(-1).float() / k, zero),
        "kl": torch.where(scored, kl, zero),
        "scored": scored,
    }


def _agreement_row_loss(teacher_head: ModelHead, mapping, vocab_size, top_k):
    def row_loss(student_logits: torch.Tensor, teacher_hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_logits = head_logits(teacher_hidden.to(teacher_head.weight.dtype), teacher_head)
        rows = agreement_rows(student_logits, teacher_logits, mapping, vocab_size, top_k)
        return {name: value.float().sum() for name, value in rows.items()}

    return row_loss


def _final_hidden(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with capture_final_hidden(model) as out:
        model(input_ids=ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
    return out["hidden"]  # (B, T, H)


@torch.no_grad()
def agreement_metrics(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterable[Batch],
    mapping: VocabMapping | None = None,
    vocab_size: int | None = None,
    top_k: int = 5,
    device: torch.device | None = None,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """Mean top-1 agreement, top-k overlap and KL(teacher || student) over the aligned positions
    (`Batch.alignment`) of two-tokenizer `batches`. `mapping` None: same vocabulary (see `agreement_rows`).

    Returns top1_agreement, top_k_overlap, top_k, kl, kl_kind (EXACT_KL or PROJECTED_KL), positions (aligned
    positions seen) and unscored_positions (seen, but without projected teacher mass)."""
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    sums = {"top1": 0.0, "overlap": 0.0, "kl": 0.0, "scored": 0.0}
    positions = 0
    for batch in batches:
        batch = batch.to(device) if device else batch
        mask = batch.alignment.mask  # (B, G)
        if not mask.any():
            continue
        s_side, t_side = batch.student, batch.teacher
        student_hidden = _final_hidden(student, s_side.input_ids, s_side.attention_mask)
        teacher_hidden = _final_hidden(teacher, t_side.input_ids, t_side.attention_mask)
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,)
        # the heads after the forwards: a sharded model's head is whole only then
        row_loss = _agreement_row_loss(model_head(teacher), mapping, vocab_size, top_k)
        _, parts = chunked_head_loss(
            student_hidden[rows, batch.alignment.student_pos[mask]],  # (N, Hs)
            model_head(student),
            row_loss,
            [teacher_hidden[rows, batch.alignment.teacher_pos[mask]]],  # (N, Ht)
            {},
            chunk_size=chunk_size,
        )
        for name in sums:
            sums[name] += float(parts[name])
        positions += int(mask.sum())
    student.train(modes[0])
    teacher.train(modes[1])
    scored = int(sums["scored"])
    if scored == 0:
        raise ValueError("no aligned positions to compare teacher and student on")
    return {
        "top1_agreement": sums["top1"] / scored,
        "top_k_overlap": sums["overlap"] / scored,
        "top_k": top_k,
        "kl": sums["kl"] / scored,
        "kl_kind": EXACT_KL if mapping is None else PROJECTED_KL,
        "positions": positions,
        "unscored_positions": positions - scored,
    }
