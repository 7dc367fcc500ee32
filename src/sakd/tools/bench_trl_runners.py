"""TRL's steps as the bench drives them (part (e)), each built in the measuring process: `runner(cfg, tokenizer,
batches, beta, out) -> (step(i) -> tokens, student)`.

- "trl": `GKDTrainer.training_step` (student and teacher full logits, generalized JSD), then what `Trainer`'s
  loop does after it: clip, optimizer and scheduler step, zero_grad.
- "trl_chunked": `DistillationTrainer.compute_loss`, TRL's chunked divergence over hidden states and LM-head
  weights (it never holds the full logits), on the data's tokens as completions of a one-token prompt
  (teacher-forced, as GKD with lmbda 0; the trainer would otherwise generate them), then backward and the same
  optimizer step.
- "gold": `GOLDTrainer.compute_loss` with its positional ULD across tokenizers, re-tokenizing each window's
  text for the teacher as GOLD does in training, then backward and the same optimizer step.

All use the run config's AdamW settings (fused), clipping and a cosine schedule, fp32 on the CPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sakd.data.batch import Batch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the GKD and GOLD trainers live in trl.experimental


def _common(cfg, out: Path, steps: int) -> dict[str, Any]:
    """Training arguments every TRL trainer here shares."""
    tc = cfg.train
    return {
        "output_dir": str(out),
        "per_device_train_batch_size": tc.batch_size,
        "temperature": 1.0,
        "learning_rate": tc.lr,
        "adam_beta1": tc.betas[0],
        "adam_beta2": tc.betas[1],
        "weight_decay": tc.weight_decay,
        "max_grad_norm": tc.max_grad_norm,
        "lr_scheduler_type": "cosine",
        "optim": "adamw_torch_fused",
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "max_steps": steps,
    }


def _models(cfg, teacher: bool = True):
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(cfg.student.model, dtype=torch.float32)
    if not teacher:
        return student, None
    return student, AutoModelForCausalLM.from_pretrained(cfg.teacher.model, dtype=torch.float32)


def _stepper(trainer, loss_of, inputs: list[dict], max_grad_norm: float):
    """One optimizer step of `trainer` on inputs[i]: loss_of(model, batch) does forward and backward."""
    trainer.create_optimizer_and_scheduler(num_training_steps=len(inputs))
    model = trainer.model

    def step(i: int) -> int:
        model.train()
        loss_of(model, dict(inputs[i]))
        trainer.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return int(inputs[i]["attention_mask"].sum())

    return step, model


def gkd_runner(cfg, tok, batches: list[Batch], beta: float, out: Path):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, teacher = _models(cfg)
    args = GKDConfig(**_common(cfg, out, len(batches)), max_length=cfg.data.max_length, lmbda=0.0, beta=beta)
    # The trainer's own data path is never used: the batches are handed to training_step directly.
    dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "w0"}]]})
    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tok
    )
    inputs = []
    for b in batches:
        ids, mask = b.student.input_ids, b.student.attention_mask
        inputs.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def loss_of(model, batch: dict) -> None:
        trainer.training_step(model, batch, (batch["labels"][:, 1:] != -100).sum())

    return _stepper(trainer, loss_of, inputs, cfg.train.max_grad_norm)


def chunked_runner(cfg, tok, batches: list[Batch], beta: float, out: Path):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    student, teacher = _models(cfg)
    args = DistillationConfig(
        **_common(cfg, out, len(batches)), max_completion_length=cfg.data.max_length, beta=beta
    )
    dataset = Dataset.from_dict({"prompt": ["w0"]})
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tok
    )
    inputs = []
    for b in batches:
        ids, mask = b.student.input_ids, b.student.attention_mask
        inputs.append(
            {
                "attention_mask": mask,
                "prompt_ids": ids[:, :1],
                "prompt_mask": mask[:, :1],
                "completion_ids": ids[:, 1:],
                "completion_mask": mask[:, 1:],
            }
        )

    def loss_of(model, batch: dict) -> None:
        batch.pop("attention_mask")
        loss = trainer.compute_loss(model, batch, num_items_in_batch=batch["completion_mask"].sum())
        trainer.accelerator.backward(loss)

    return _stepper(trainer, loss_of, inputs, cfg.train.max_grad_norm)


def gold_runner(cfg, tok, batches: list[Batch], beta: float, out: Path):
    from datasets import Dataset
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    student, _ = _models(cfg, teacher=False)  # GOLD loads its teacher from the path itself
    args = GOLDConfig(
        **_common(cfg, out, len(batches)),
        max_length=cfg.data.max_length,
        max_completion_length=cfg.data.max_length // 2,  # generation only; must leave room for a prompt
        lmbda=0.0,
        use_uld_loss=True,
        use_extended_uld=False,
        uld_crossentropy_weight=0.0,
        teacher_tokenizer_name_or_path=cfg.teacher.model,
    )
    # GOLD prepares its (unused, one-row) dataset through a chat template, which the bench's tokenizers lack.
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    dataset = Dataset.from_dict({"messages": [[{"role": "user", "content": "w0"}]]})
    trainer = GOLDTrainer(
        model=student, teacher_model=cfg.teacher.model, args=args, train_dataset=dataset, processing_class=tok
    )
    inputs = []
    for b in batches:
        ids, mask = b.student.input_ids, b.student.attention_mask
        texts = [tok.decode(row[m.bool()]) for row, m in zip(ids, mask, strict=True)]
        inputs.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, -100),
                "original_prompt_text": [""] * len(texts),
                "original_completion_text": texts,
            }
        )

    def loss_of(model, batch: dict) -> None:
        trainer.accelerator.backward(trainer.compute_loss(model, batch))

    return _stepper(trainer, loss_of, inputs, cfg.train.max_grad_norm)


RUNNERS = {"trl": gkd_runner, "trl_chunked": chunked_runner, "gold": gold_runner}
