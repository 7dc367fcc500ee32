"""The bench's hand-written reference distillation step (part (b)): what a user would write by hand."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sakd.config import Config
from sakd.data.batch import Batch


class ReferenceStep:
    """A minimal hand-written distillation step with full logits (transformers' default attention)."""

    def __init__(
        self, teacher: Path, student: Path, cfg: Config, teacher_dtype: torch.dtype, accelerator, point
    ):
        device = accelerator.device
        self.autocast = accelerator.autocast
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher, dtype=teacher_dtype).to(device).eval()
        self.teacher.requires_grad_(False)
        self.student = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).to(device).train()
        tc = cfg.train
        # the same fused AdamW as sakd's step, so that the comparison is of everything else
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(),
            lr=tc.lr,
            betas=tuple(tc.betas),
            weight_decay=tc.weight_decay,
            fused=True,
        )
        self.temperature = point.temperature
        self.lm_weight, self.kd_weight = point.weights["lm"], point.weights["kd"]

    def step(self, batches: list[Batch]) -> int:
        tokens = 0
        for batch in batches:
            labels = batch.student.labels  # (B, L)
            with self.autocast():
                with torch.no_grad():
                    t_logits = self.teacher(
                        input_ids=batch.teacher.input_ids,
                        attention_mask=batch.teacher.attention_mask,
                        use_cache=False,
                    ).logits  # (B, L, V)
                s_logits = self.student(
                    input_ids=batch.student.input_ids,
                    attention_mask=batch.student.attention_mask,
                    use_cache=False,
                ).logits  # (B, L, V)
            rows = labels != -100
            s, t, temp = s_logits[rows].float(), t_logits[rows].float(), self.temperature  # (N, V)
            kd = F.kl_div(
                F.log_softmax(s / temp, -1),
                F.log_softmax(t / temp, -1),
                log_target=True,
                reduction="batchmean",
            )
            loss = self.lm_weight * F.cross_entropy(s, labels[rows]) + self.kd_weight * temp**2 * kd
            (loss / len(batches)).backward()
            tokens += int(batch.student.attention_mask.sum())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return tokens
