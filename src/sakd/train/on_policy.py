"""On-policy distillation (GKD's lambda): some micro-batches are text the student writes itself.

A drawn micro-batch keeps the first `on_policy_prompt_tokens` student tokens of each of its windows as a
prompt, and the current student samples `on_policy_new_tokens` more after each (fewer where it writes its
EOS). The text is tokenized and aligned afresh for both models (`sakd.data.sampled`), so the teacher's
distillation targets are about what the student would write, not only about the data. The draw depends on
the seed, the step and the micro-batch, the same on every process (a sharded student must run the same
forwards everywhere); the sampling, on those and the process. Neither touches the global random state, so a
resumed run draws and samples exactly what the uninterrupted one did.
"""

from __future__ import annotations

import inspect
import logging

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from transformers import DynamicCache

from sakd.config import Config
from sakd.curriculum import CurriculumPoint
from sakd.data.batch import Batch
from sakd.data.packing import Window
from sakd.data.sampled import SampledRow, SampledText
from sakd.errors import UserError
from sakd.models.load import unwrap

log = logging.getLogger("sakd")


class OnPolicy:
    """Replaces drawn micro-batches of a step by the student's own text (`__call__`)."""

    def __init__(self, cfg: Config, student_tok, teacher_tok, process: int = 0):
        self.settings = cfg.distill  # its on_policy_* fields
        self.text = SampledText(student_tok, teacher_tok, cfg.data.max_length)
        self.eos, self.vocab = student_tok.eos_token_id, len(student_tok)
        self.seed, self.process = cfg.train.seed, process

    @staticmethod
    def of(cfg: Config, windows: list[Window], tokenizers: tuple, process: int = 0) -> OnPolicy | None:
        """The run's on-policy sampler for its training `windows`; None when `distill.on_policy_fraction` is
        0. A UserError for chat data, whose prompts and answers it does not yet tell apart."""
        s = cfg.distill
        if s.on_policy_fraction == 0:
            return None
        if any(w.student_target is not None for w in windows):
            raise UserError(
                "distill.on_policy_fraction works on plain text data only for now: these rows are chat or "
                "prompt-completion rows (set it to 0)"
            )
        log.info(
            "on-policy: %.0f%% of micro-batches are the student's own text (%d prompt tokens from the data, "
            "%d sampled at temperature %g)",
            100 * s.on_policy_fraction,
            s.on_policy_prompt_tokens,
            s.on_policy_new_tokens,
            s.on_policy_temperature,
        )
        return OnPolicy(cfg, *tokenizers, process)

    def drawn(self, step: int, micro_batch: int) -> bool:
        """Whether micro-batch `micro_batch` of optimizer step `step` is the student's own text."""
        draw = np.random.default_rng([self.seed, step, micro_batch]).random()
        return bool(draw < self.settings.on_policy_fraction)

    def __call__(
        self,
        student: nn.Module,
        batches: list[Batch],
        step: int,
        point: CurriculumPoint,
        accelerator: Accelerator,
    ) -> tuple[list[Batch], int]:
        """The step's host micro-batches with the drawn ones replaced by the student's text, and how many
        were. Nothing is drawn while KD's weight is 0 (the teacher would judge nothing)."""
        if point.weights["kd"] <= 0:
            return batches, 0
        out, replaced = [], 0
        for i, batch in enumerate(batches):
            own = None
            if self.drawn(step, i):
                seed = int(np.random.default_rng([self.seed, step, i, self.process, 1]).integers(2**62))
                own = self.rewrite(student, batch, seed, accelerator)
            replaced += own is not None
            out.append(own if own is not None else batch)
        return out, replaced

    def rewrite(self, student: nn.Module, batch: Batch, seed: int, accelerator: Accelerator) -> Batch | None:
        """The batch's prompts continued by the student (None: a row's text gives no window, and the data's
        batch stays)."""
        prefix = len(self.text.formats[0].prefix)
        ids = batch.student.input_ids
        mask = batch.student.attention_mask
        shortest = int(mask.sum(1).min()) if mask is not None else ids.shape[1]
        # One prompt length for the whole micro-batch (only a last, shorter window lowers it): the rows sample
        # together without padding, and every process runs the same number of forwards.
        prompts = ids[
            :, : prefix + min(self.settings.on_policy_prompt_tokens, shortest - prefix)
        ]  # (B, prefix + P)
        generator = torch.Generator(accelerator.device).manual_seed(seed)
        with accelerator.autocast():
            new = sample_tokens(
                unwrap(student),
                prompts.to(accelerator.device),
                self.settings.on_policy_new_tokens,
                self.settings.on_policy_temperature,
                generator,
                self.vocab,
            )
        rows = [
            SampledRow(prompt[prefix:].tolist(), _until_eos(tokens, self.eos), int(window))
            for prompt, tokens, window in zip(prompts, new.tolist(), batch.window_index, strict=True)
        ]
        return self.text.batch(rows)


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,
    new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    vocab: int | None = None,
) -> torch.Tensor:
    """(B, new_tokens) token ids sampled after `input_ids` (B, P) from the model's own distribution at
    `temperature`, with its key-value cache; every row runs all `new_tokens` forwards (the caller cuts at
    EOS), so that processes that shard the model run the same forwards. Draws come from `generator` only.
    `vocab`: only the first this many ids (the tokenizer's; a model's embedding may be padded beyond)."""
    was_training = model.training
    model.eval()
    cache = {_cache_argument(model): DynamicCache(config=model.config)}  # filled in place by each forward
    try:
        logits = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache).logits
        tokens = []
        for i in range(new_tokens):
            probs = torch.softmax(logits[:, -1, :vocab].float() / temperature, dim=-1)  # (B, V)
            token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            tokens.append(token)
            if i + 1 < new_tokens:
                logits = model(input_ids=token, use_cache=True, logits_to_keep=1, **cache).logits
        return torch.cat(tokens, dim=1)
    finally:
        model.train(was_training)


def _cache_argument(model: nn.Module) -> str:
    """The name of the model's key-value cache argument (`cache` since transformers 5.x replaced
    `past_key_values`); a LoRA wrapper is asked about its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _until_eos(tokens: list[int], eos: int | None) -> list[int]:
    """`tokens` up to and including the first EOS."""
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens
