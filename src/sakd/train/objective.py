"""The distillation objective for one micro-batch: forward passes, aligned rows, chunked and auxiliary losses.

Both models' final hidden states are captured by hooks; the LM heads are applied chunk by chunk inside
`chunked_head_loss`, so no (tokens x vocabulary) logits of either model exist in full. The auxiliary losses on
aligned groups are `sakd.train.auxiliary`'s; which parts run, and with which weights, temperature and top-k,
comes from the curriculum point of the current optimizer step.

With a teacher cache (`cached=True`) no teacher runs: batches carry the cached top-k distributions of their
aligned groups (`sakd.cache`), KD uses `sparse_teacher_divergence`, and of the auxiliary parts only the KD token
weights remain (their knowledge gap is the same sparse divergence).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from typing import Any

import torch
from torch import nn

from sakd.curriculum import CurriculumPoint
from sakd.errors import UserError
from sakd.losses import (
    CROSS_VOCAB_LOSSES,
    ChunkBuffers,
    build_vocab_mapping,
    chunk_rows,
    chunked_head_loss,
    divergence,
    make_distill_row_loss,
)
from sakd.losses.fused import (
    FusedCachedForwardKL,
    FusedForwardKL,
    TargetFn,
    projected_target,
    same_vocab_target,
)
from sakd.losses.lm import make_cached_distill_row_loss, sparse_teacher_divergence
from sakd.models.attention import capture_attentions
from sakd.models.head import model_head
from sakd.models.load import capture_final_hidden, unwrap
from sakd.train.auxiliary import AuxiliaryLosses, AuxNeeds, DistillHeads
from sakd.train.rows import TokenCounts, first_rows, loss_rows
from sakd.train.teacher import teacher_pass


def same_vocabulary(teacher_tokenizer, student_tokenizer) -> bool:
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


class DistillObjective:
    """KD (same- or cross-vocabulary) + LM cross-entropy + auxiliary losses, from a frozen teacher."""

    def __init__(
        self,
        teacher_tokenizer=None,
        student_tokenizer=None,
        divergence_name: str = "forward_kl",
        beta: float = 0.5,
        cross_vocab: str = "projection",
        chunk_size: int = 1024,
        heads: DistillHeads | None = None,
        sources=None,
        attention_loss: str = "kl",
        contrastive_temperature: float = 0.1,
        cached: bool = False,
        chunk_logits: int | None = None,
        fused_loss: bool = False,
    ):
        self.chunk_size = chunk_size
        self.chunk_logits = chunk_logits
        self.buffers = ChunkBuffers()  # the chunks' (rows x vocabulary) tensors, kept between steps on CPU
        # (student logit width) -> the teacher target of the fused forward-KL path
        self._fused_target: Callable[[int], TargetFn] | None = None
        self._fused_cached: dict[str, Any] | None = None  # FusedCachedForwardKL's arguments
        self.cached = cached
        self.aux = None
        if heads is not None:
            self.aux = AuxiliaryLosses(
                heads,
                sources,
                attention_loss,
                contrastive_temperature,
                self.kd_fn,
                self.rows_per_chunk,
                cached,
            )
        self._kd = None
        self.mapping = None
        self.kind = "LM only"
        if teacher_tokenizer is not None and cached:
            self._kd = self._cached_kd(
                teacher_tokenizer, student_tokenizer, divergence_name, beta, cross_vocab
            )
            if fused_loss and divergence_name == "forward_kl":
                self._fused_cached = {
                    k: v
                    for k, v in self._kd.keywords.items()
                    if k in ("teacher_vocab_size", "student_vocab", "teacher_to_student")
                }
        elif teacher_tokenizer is not None:
            if same_vocabulary(teacher_tokenizer, student_tokenizer):
                self._kd = partial(_same_vocab_kd, len(student_tokenizer), divergence_name, beta)
                self.kind = f"same-vocabulary {divergence_name}"
                if fused_loss and divergence_name == "forward_kl":
                    vocab = len(student_tokenizer)
                    self._fused_target = lambda _width: same_vocab_target(vocab)
            else:
                self.mapping = build_vocab_mapping(teacher_tokenizer, student_tokenizer)
                kwargs: dict[str, Any] = {"mapping": self.mapping}
                if cross_vocab != "uld":
                    kwargs.update(divergence=divergence_name, beta=beta)
                self._kd = partial(CROSS_VOCAB_LOSSES[cross_vocab], **kwargs)
                self.kind = f"cross-vocabulary {cross_vocab}"
                if fused_loss and divergence_name == "forward_kl" and cross_vocab == "projection":
                    mapping = self.mapping
                    self._fused_target = lambda width: projected_target(mapping, width)

    def _cached_kd(self, teacher_tokenizer, student_tokenizer, divergence_name, beta, cross_vocab):
        sparse = partial(
            sparse_teacher_divergence,
            name=divergence_name,
            beta=beta,
            teacher_vocab_size=len(teacher_tokenizer),
        )
        if same_vocabulary(teacher_tokenizer, student_tokenizer):
            self.kind = f"same-vocabulary {divergence_name} (cached top-k teacher)"
            return partial(sparse, student_vocab=len(student_tokenizer))
        if cross_vocab != "projection":
            raise UserError(
                f"a cached teacher supports the cross-vocabulary projection only (its top-k cannot be sorted "
                f"for {cross_vocab}): set distill.cross_vocab=projection, or drop teacher.cache"
            )
        if divergence_name == "reverse_kl" or (divergence_name == "jsd" and beta == 1.0):
            raise UserError(
                "reverse KL against a projected teacher is infinite: use forward_kl, jsd with beta < 1, or tvd"
            )
        self.mapping = build_vocab_mapping(teacher_tokenizer, student_tokenizer)
        self.kind = f"cross-vocabulary projection {divergence_name} (cached top-k teacher)"
        return partial(sparse, teacher_to_student=self.mapping.teacher_to_student)

    def rows_per_chunk(self, *heads: nn.Module | None) -> int:
        """Rows per chunk for the LM heads a chunk applies (the widest vocabulary sets the bound)."""
        vocab = max(h.weight.shape[0] for h in heads if h is not None)
        return chunk_rows(self.chunk_size, self.chunk_logits, vocab)

    def kd_fn(self, temperature: float):
        """Per-row KD at `temperature`: (student logits (n, V_s), teacher logits (n, V_t)) -> (n,); with a
        cache (student logits, teacher ids (n, k), probs (n, k), tail (n,)) -> (n,)."""
        return None if self._kd is None else partial(self._kd, temperature=temperature)

    def __call__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        batch: dict[str, torch.Tensor],
        point: CurriculumPoint,
        counts: TokenCounts,
        scale: float = 1.0,
        micro_batches: int = 1,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch. Token-level parts are sums divided by the step's global token counts
        (times `scale`, the number of processes, since DDP averages gradients); batch-level parts
        (balance, contrastive) are means divided by `micro_batches`. Returns (loss, unweighted parts)."""
        w = point.weights
        labels = batch["student_labels"]  # (B, Ls)
        has_teacher = teacher is not None or self.cached
        use_kd = has_teacher and self._kd is not None and w["kd"] > 0
        aux = self.aux if has_teacher else None
        needs = AuxNeeds.at(w, use_kd) if aux is not None else AuxNeeds()

        with ExitStack() as stack:
            s_out = stack.enter_context(capture_final_hidden(student))
            s_attn = stack.enter_context(capture_attentions(unwrap(student))) if needs.attention else None
            s_result = student(
                input_ids=batch["student_input_ids"],
                attention_mask=batch.get("student_attention_mask"),  # absent: no padding (`prepare_batch`)
                logits_to_keep=1,
                use_cache=False,
                output_hidden_states=needs.layers,
            )
        hidden = s_out["hidden"]  # (B, Ls, H)
        plan = batch if "rows_student" in batch else loss_rows(batch)
        rows = plan["rows_student"]  # (N,) flat student positions with a label, the K distillation rows first
        n, k = rows.shape[0], plan["rows_teacher"].shape[0] if use_kd else 0

        t_pass = None
        if not self.cached and (use_kd or needs.teacher):
            sources = aux.sources if needs.sources else None
            t_pass = self.teacher_pass(teacher, batch, sources, needs.attention, needs.layers)
        if use_kd and self.cached:
            teacher_rows = [
                first_rows(batch[key].flatten(0, 1), plan["rows_group"], n)
                for key in ("cache_ids", "cache_probs", "cache_tail")
            ]
        elif use_kd:
            teacher_rows = [first_rows(t_pass.hidden.flatten(0, 1), plan["rows_teacher"], n)]
            t_head = model_head(teacher)
        else:
            teacher_rows = [hidden.new_zeros((n, 1))]
        kd_mask = torch.arange(n, device=hidden.device) < k  # (N,)
        kd_weight = torch.ones(n, device=hidden.device)
        extra, parts, group_weights = hidden.new_zeros((), dtype=torch.float32), {}, None
        if aux is not None:
            extra, parts, group_weights = aux(
                needs,
                student,
                teacher,
                batch,
                hidden,
                s_attn,
                s_result,
                t_pass,
                point,
                counts,
                scale,
                micro_batches,
            )
        if group_weights is not None:
            # one weight per aligned group in (b, g) order; the K rows name their groups
            order = batch["align_mask"].flatten().cumsum(0) - 1  # (B * G,) rank of each aligned group
            kd_weight[:k] = group_weights.index_select(0, order.index_select(0, plan["rows_group"]))

        s_head = model_head(student)
        kd = self.kd_fn(point.temperature) if use_kd else None
        if self.cached and use_kd:
            row_loss = make_cached_distill_row_loss(kd)
            if self._fused_cached is not None:
                row_loss = FusedCachedForwardKL(row_loss, point.temperature, **self._fused_cached)
        else:
            row_loss = make_distill_row_loss(kd, t_head if use_kd else None)
            if use_kd and self._fused_target is not None:
                row_loss = FusedForwardKL(
                    row_loss,
                    self._fused_target(s_head.weight.shape[0]),
                    t_head,
                    None,
                    point.temperature,
                )
        part_weights = {"lm": scale * w["lm"] / max(counts.lm, 1)}
        if use_kd:
            part_weights["kd"] = scale * w["kd"] / max(counts.kd, 1)
        total, sums = chunked_head_loss(
            hidden.flatten(0, 1).index_select(0, rows),
            s_head,
            row_loss,
            [labels.flatten().index_select(0, rows), *teacher_rows, kd_mask, kd_weight],
            part_weights,
            chunk_size=self.rows_per_chunk(s_head, t_head if use_kd and not self.cached else None),
            kd_rows=k,
            buffers=self.buffers,
        )
        parts["lm"] = sums["lm"] / max(counts.lm, 1)
        if "kd" in sums:
            parts["kd"] = sums["kd"] / max(counts.kd, 1)
        return total + extra, {k: v.detach() for k, v in parts.items()}

    # the teacher's forward, as a class attribute so that tests can stand in for it
    teacher_pass = staticmethod(teacher_pass)


def _same_vocab_kd(
    vocab: int, name: str, beta: float, s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Both logit widths may be padded beyond the tokenizer's size: compare over the real vocabulary."""
    t_logprobs = torch.log_softmax(t_logits[:, :vocab].float() / temperature, dim=-1)
    return divergence(name, s_logits[:, :vocab], t_logprobs, temperature, beta=beta)
