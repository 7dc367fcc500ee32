"""The distillation objective for one micro-batch: forward passes, aligned rows, chunked losses.

Both models' final hidden states are captured by hooks; the LM heads are applied chunk by chunk inside
`chunked_head_loss`, so no (tokens x vocabulary) logits of either model exist in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from sakd.losses import (
    CROSS_VOCAB_LOSSES,
    build_vocab_mapping,
    chunked_head_loss,
    divergence,
    make_distill_row_loss,
)
from sakd.models.load import capture_final_hidden, lm_head, unwrap


def same_vocabulary(teacher_tokenizer, student_tokenizer) -> bool:
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


@dataclass
class TokenCounts:
    """Global (all micro-batches of one optimizer step, all processes) counts that normalise the loss sums."""

    lm: int
    kd: int

    @staticmethod
    def of(batches: list[dict[str, torch.Tensor]]) -> TokenCounts:
        lm = sum(int((b["student_labels"] != -100).sum()) for b in batches)
        kd = sum(int(b["align_mask"].sum()) for b in batches if "align_mask" in b)
        return TokenCounts(lm, kd)


class DistillObjective:
    """KD (same- or cross-vocabulary) + LM cross-entropy on a student, from a frozen teacher."""

    def __init__(
        self,
        teacher_tokenizer=None,
        student_tokenizer=None,
        divergence_name: str = "forward_kl",
        jsd_beta: float = 0.5,
        cross_vocab: str = "projection",
        temperature: float = 1.0,
        chunk_size: int = 1024,
    ):
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.kd_fn = None
        self.same_vocab = None
        self.mapping = None
        if teacher_tokenizer is not None:
            self.same_vocab = same_vocabulary(teacher_tokenizer, student_tokenizer)
            if self.same_vocab:
                vocab = len(student_tokenizer)
                self.kd_fn = partial(_same_vocab_kd, vocab, divergence_name, temperature, jsd_beta)
                self.kind = f"same-vocabulary {divergence_name}"
            else:
                self.mapping = build_vocab_mapping(teacher_tokenizer, student_tokenizer)
                loss = CROSS_VOCAB_LOSSES[cross_vocab]
                kwargs = {"divergence": divergence_name} if cross_vocab != "uld" else {}
                if cross_vocab == "projection":
                    kwargs["beta"] = jsd_beta
                self.kd_fn = partial(loss, mapping=self.mapping, temperature=temperature, **kwargs)
                self.kind = f"cross-vocabulary {cross_vocab}"
        else:
            self.kind = "LM only"

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: dict[str, torch.Tensor],
        weights: dict[str, float],
        counts: TokenCounts,
        scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch, already divided by the global token counts (times `scale`, the number of
        processes, since DDP averages gradients). Returns (loss, {part: sum over this micro-batch})."""
        labels = batch["student_labels"]  # (B, Ls)
        with capture_final_hidden(student) as s_out:
            student(
                input_ids=batch["student_input_ids"],
                attention_mask=batch["student_attention_mask"],
                logits_to_keep=1,
                use_cache=False,
            )
        hidden = s_out["hidden"]  # (B, Ls, H)
        rows = labels != -100  # (B, Ls)

        use_kd = teacher is not None and self.kd_fn is not None and weights.get("kd", 0.0) > 0
        t_head = lm_head(unwrap(teacher)) if use_kd else None
        if use_kd:
            t_hidden = self.teacher_hidden(teacher, batch)  # (B, Lt, Ht)
            kd_rows, t_rows = self.aligned_teacher_rows(batch, t_hidden)
        else:
            kd_rows = torch.zeros_like(rows)
            t_rows = hidden.new_zeros((*rows.shape, 1))

        s_head = lm_head(unwrap(student))
        row_loss = make_distill_row_loss(
            self.kd_fn if use_kd else None,
            t_head.weight if use_kd else None,
            t_head.bias if use_kd else None,
        )
        kd_mask = kd_rows[rows]
        part_weights = {
            "lm": scale * weights.get("lm", 0.0) / max(counts.lm, 1),
            "kd": scale * weights.get("kd", 0.0) / max(counts.kd, 1) if use_kd else 0.0,
        }
        return chunked_head_loss(
            hidden[rows],
            s_head.weight,
            row_loss,
            [labels[rows], t_rows[rows], kd_mask, torch.ones(kd_mask.shape, device=hidden.device)],
            part_weights,
            chunk_size=self.chunk_size,
            bias=s_head.bias,
        )

    @staticmethod
    @torch.no_grad()
    def teacher_hidden(teacher: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with capture_final_hidden(teacher) as t_out:
            teacher(
                input_ids=batch["teacher_input_ids"],
                attention_mask=batch["teacher_attention_mask"],
                logits_to_keep=1,
                use_cache=False,
            )
        return t_out["hidden"]

    @staticmethod
    def aligned_teacher_rows(
        batch: dict[str, torch.Tensor], t_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Place each aligned group's teacher hidden state at its student position.

        Returns kd_rows (B, Ls) bool and teacher rows (B, Ls, Ht) (zeros where no group ends)."""
        b, ls = batch["student_labels"].shape
        mask = batch["align_mask"]  # (B, G)
        bi = torch.arange(b, device=mask.device)[:, None].expand_as(mask)[mask]
        s_pos = batch["align_student_pos"][mask]
        t_pos = batch["align_teacher_pos"][mask]
        kd_rows = torch.zeros((b, ls), dtype=torch.bool, device=mask.device)
        kd_rows[bi, s_pos] = True
        t_rows = t_hidden.new_zeros((b, ls, t_hidden.shape[-1]))
        t_rows[bi, s_pos] = t_hidden[bi, t_pos]
        return kd_rows, t_rows


def _same_vocab_kd(
    vocab: int, name: str, temperature: float, beta: float, s_logits: torch.Tensor, t_logits: torch.Tensor
) -> torch.Tensor:
    """Both logit widths may be padded beyond the tokenizer's size: compare over the real vocabulary."""
    t_logprobs = torch.log_softmax(t_logits[:, :vocab].float() / temperature, dim=-1)
    return divergence(name, s_logits[:, :vocab], t_logprobs, temperature, beta=beta)
