"""The distillation objective for one micro-batch: forward passes, loss rows, chunked and auxiliary losses.

The student's final hidden state is captured by a hook; the LM heads are applied chunk by chunk inside
`chunked_head_loss`, so no (tokens x vocabulary) logits exist in full. Where the teacher's targets come from
(the live model or a cache) is the `Teacher`'s business (`sakd.train.teacher`): the objective asks it for the
KD row inputs and the row loss. The auxiliary losses on aligned groups are `sakd.train.auxiliary`'s; which
parts run, and with which weights, temperature and top-k, comes from the curriculum point of the current step.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from sakd.curriculum import CurriculumPoint
from sakd.data.batch import Batch
from sakd.losses import ChunkBuffers, Chunking, chunked_head_loss, make_distill_row_loss
from sakd.losses.chunk_likelihood import ChunkLikelihood, WithChunkLikelihood
from sakd.models.attention import capture_attentions
from sakd.models.head import model_head
from sakd.models.load import NO_LOGITS, capture_final_hidden, unwrap
from sakd.train.auxiliary import AuxiliaryLosses, AuxNeeds, StudentPass
from sakd.train.likelihood import chunk_likelihood_rows
from sakd.train.rows import LossNorm
from sakd.train.teacher import Teacher, TeacherRequest


class DistillObjective:
    """KD from a `Teacher` (None: LM only) + LM cross-entropy + the auxiliary losses (`aux`, optional)."""

    def __init__(
        self,
        teacher: Teacher | None = None,
        chunking: Chunking | None = None,
        aux: AuxiliaryLosses | None = None,
        likelihood: ChunkLikelihood | None = None,
    ):
        self.teacher = teacher
        self.likelihood = likelihood if teacher is not None and likelihood and likelihood.weight > 0 else None
        self.chunking = chunking or Chunking()
        self.aux = aux if teacher is not None else None
        self.buffers = ChunkBuffers()  # the chunks' (rows x vocabulary) tensors, kept between steps on CPU
        self.kind = teacher.kind if teacher is not None else "LM only"
        if self.likelihood is not None:
            self.kind += " + chunk likelihood"
        self.mapping = getattr(teacher, "mapping", None)

    def __call__(
        self, student: nn.Module, batch: Batch, point: CurriculumPoint, norm: LossNorm
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-batch. Token-level parts are sums divided by the step's global token counts
        (times the number of processes, since DDP averages gradients); batch-level parts (balance, contrastive)
        are means divided by the number of micro-batches. Returns (loss, unweighted parts)."""
        w, teacher = point.weights, self.teacher
        use_kd = teacher is not None and w["kd"] > 0
        needs = AuxNeeds.at(w, use_kd) if self.aux is not None else AuxNeeds()
        s_pass = self._student_pass(student, batch, needs)
        hidden = s_pass.hidden  # (B, Ls, H)
        rows = batch.rows  # (`prepare_batch`)
        n, k = rows.student.shape[0], rows.teacher.shape[0] if use_kd else 0

        t_pass = None
        if use_kd or needs.teacher:
            request = TeacherRequest(
                self.aux.sources if needs.sources else None, needs.attention, needs.layers
            )
            t_pass = teacher.run(batch, request)
        extra, parts = hidden.new_zeros((), dtype=torch.float32), {}
        kd_weight = torch.ones(n, device=hidden.device)
        if self.aux is not None:
            extra, parts, group_weights = self.aux(needs, batch, s_pass, t_pass, point, norm)
            if group_weights is not None:
                # one weight per aligned group in (b, g) order; the K rows name their groups
                order = batch.alignment.mask.flatten().cumsum(0) - 1  # (B * G,) rank of each aligned group
                kd_weight[:k] = group_weights.index_select(0, order.index_select(0, rows.group))

        s_head = s_pass.head
        if use_kd:
            row_weights = teacher.kd_row_weights(batch, rows, n)
            if row_weights is not None:
                kd_weight = kd_weight * row_weights
            teacher_rows = teacher.kd_inputs(batch, rows, t_pass, n)
            row_loss = teacher.row_loss(point, s_head)
            chunk = self.chunking.rows(s_head, *teacher.chunk_heads())
        else:
            teacher_rows = [hidden.new_zeros((n, 1))]
            row_loss = make_distill_row_loss(None, None)
            chunk = self.chunking.rows(s_head)
        counts = norm.counts
        part_weights = {"lm": norm.token_weight(w["lm"], counts.lm)}
        if use_kd:
            part_weights["kd"] = norm.token_weight(w["kd"], counts.kd)
        kd_mask = torch.arange(n, device=hidden.device) < k  # (N,)
        student_rows = hidden.flatten(0, 1).index_select(0, rows.student)  # (N, Hs)
        labels = batch.lm_labels().flatten().index_select(0, rows.student)  # (N,)
        row_inputs = [labels, *teacher_rows, kd_mask, kd_weight]
        if use_kd and self.likelihood is not None:
            coefficients, alm = chunk_likelihood_rows(
                self.likelihood, batch, rows, (student_rows, s_head), (teacher, t_pass), self.chunking
            )
            # the term reaches every next token, those the student sampled itself too
            next_tokens = labels
            if batch.sampled is not None:
                next_tokens = batch.student.labels.flatten().index_select(0, rows.student)  # (N,)
            row_loss = WithChunkLikelihood(row_loss)
            row_inputs = [*row_inputs, coefficients, next_tokens]
            part_weights["alm"] = norm.token_weight(self.likelihood.weight * w["kd"], counts.kd)
            parts["alm"] = alm / max(counts.kd, 1)
        total, sums = chunked_head_loss(
            student_rows,
            s_head,
            row_loss,
            row_inputs,
            part_weights,
            chunk_size=chunk,
            kd_rows=k,
            buffers=self.buffers,
        )
        if "alm" in sums:
            # the row loss's "alm" is a stand-in with the term's gradient; the total carries the term's value
            total = total + part_weights["alm"] * (alm - sums["alm"])
        parts["lm"] = sums["lm"] / max(counts.lm, 1)
        if "kd" in sums:
            parts["kd"] = sums["kd"] / max(counts.kd, 1)
        return total + extra, {name: v.detach() for name, v in parts.items()}

    @staticmethod
    def _student_pass(student: nn.Module, batch: Batch, needs: AuxNeeds) -> StudentPass:
        with ExitStack() as stack:
            s_out = stack.enter_context(capture_final_hidden(student))
            s_attn = stack.enter_context(capture_attentions(unwrap(student))) if needs.attention else None
            result = student(
                input_ids=batch.student.input_ids,
                attention_mask=batch.student.attention_mask,  # None: no padding (`prepare_batch`)
                logits_to_keep=NO_LOGITS,
                use_cache=False,
                output_hidden_states=needs.layers,
            )
        return StudentPass(
            s_out["hidden"],
            model_head(student),
            s_attn.maps[0] if s_attn is not None else None,
            result.hidden_states if needs.layers else None,
        )
