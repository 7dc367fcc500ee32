"""What one optimizer step needs, and the step itself; `train()` and `sakd bench` share both, so the bench
measures the step that training runs."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from accelerate import Accelerator

from sakd.cache.training import CachedTeacher, teacher_skeleton
from sakd.config import Config
from sakd.curriculum import AUX_LOSSES, CurriculumPoint
from sakd.data.batch import Batch, Side
from sakd.errors import UserError
from sakd.losses import Chunking
from sakd.losses.chunk_likelihood import ChunkLikelihood
from sakd.losses.kd import KDSettings, logit_kd, same_vocabulary, top_k_kd
from sakd.models.attention import attention_implementation
from sakd.models.head import check_head
from sakd.models.load import freeze, load_model, load_tokenizer, unwrap, weights_dtype
from sakd.models.lora import apply_lora
from sakd.train.auxiliary import AuxiliaryLosses, DistillHeads, build_heads
from sakd.train.collective import average_gradients, global_counts
from sakd.train.ema import EMA
from sakd.train.nonfinite import all_finite
from sakd.train.objective import DistillObjective
from sakd.train.rows import LossNorm, TokenCounts, with_loss_rows
from sakd.train.schedule import make_scheduler
from sakd.train.sharding import compile_layers, full_tensor, place_teacher, shard
from sakd.train.teacher import LiveTeacher, TopKTeacher

log = logging.getLogger("sakd")


@dataclass
class Training:
    """The models, objective and optimizer state of a run; `student` and `optimizer` are Accelerate-prepared."""

    cfg: Config
    accelerator: Accelerator
    teacher: torch.nn.Module | None
    student: torch.nn.Module
    heads: DistillHeads | None
    objective: DistillObjective
    optimizer: Any
    scheduler: Any
    ema: EMA | None
    attention: str


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step, prepared on the host (`step_batches`)."""

    batches: list[Batch]  # on the device, with their loss rows (`prepare_batch`)
    counts: TokenCounts  # over all processes: they normalise the loss sums
    tokens: int  # student tokens over all processes
    windows: list[int]  # this process's windows


@dataclass
class StepResult:
    """Every tensor stays on the device: reading one waits for the step to finish."""

    loss: torch.Tensor  # summed over micro-batches, this process
    parts: dict[str, torch.Tensor]
    grad_norm: torch.Tensor
    stepped: torch.Tensor  # bool; False when the step was skipped (a non-finite loss or gradient)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and embeddings' 1-d parameters."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_training(
    cfg: Config,
    accelerator: Accelerator,
    precision: str,
    student_tok,
    teacher_tok,
    cached: CachedTeacher | None = None,
) -> Training:
    """Load the teacher (unless a cache replaces it) and the student, and build heads, objective, AdamW,
    scheduler and EMA as `sakd train` does."""
    tc = cfg.train
    full = cfg.curriculum.weights
    needs_maps = cfg.teacher is not None and full.attention > 0
    teacher = None
    attn = attention_implementation(needs_maps, cfg.student.attn_implementation)
    if cfg.teacher is not None and cached is None:
        teacher_dtype = cfg.teacher.dtype if cfg.teacher.dtype != "auto" else precision
        teacher_attn = attention_implementation(needs_maps, cfg.teacher.attn_implementation)
        teacher = freeze(load_model(cfg.teacher.model, "teacher", weights_dtype(teacher_dtype), teacher_attn))
        teacher = place_teacher(teacher, cfg.teacher.placement, accelerator.device, accelerator.num_processes)
        if tc.compile:
            compile_layers(teacher)
    # Trainable weights stay fp32 (master weights); mixed precision comes from autocast and a GradScaler.
    student = load_model(
        cfg.student.model,
        "student",
        torch.float32,
        attn,
        random_init=cfg.student.init == "random",
        seed=tc.seed,
    )
    student = apply_lora(student, cfg.student.lora, tc.strategy == "fsdp" and accelerator.num_processes > 1)
    student.train()
    if tc.compile:
        compile_layers(student)
    heads = sources = None
    if cfg.teacher is not None and any(getattr(full, k) > 0 for k in AUX_LOSSES):
        heads, sources = build_heads(
            student,
            teacher if teacher is not None else teacher_skeleton(cfg.teacher.model),
            cfg.router,
            cfg.distill.layer_map,
            cfg.distill.layerwise_pairs,
        )
        heads.to(accelerator.device)
    objective = build_objective(
        cfg, teacher, student_tok, teacher_tok, heads, sources, accelerator.device.type
    )
    sharded = tc.strategy == "fsdp" and accelerator.num_processes > 1
    alone = accelerator.num_processes == 1
    if alone and (tc.strategy == "fsdp" or (cfg.teacher is not None and cfg.teacher.placement == "shard")):
        log.info(
            "one process: nothing to shard (train.strategy fsdp / teacher.placement shard act over processes)"
        )
    if sharded:
        if heads is not None:
            raise UserError(
                "train.strategy=fsdp does not support the auxiliary losses' heads yet (feature, attention, "
                "router, balance, layerwise, contrastive, token_weighting): set their weights to 0, or use ddp"
            )
        shard(student)  # before the optimizer, which must see the shards
    groups = param_groups(student, tc.weight_decay)
    if heads is not None:
        groups.append({"params": list(heads.parameters()), "weight_decay": 0.0, "lr": cfg.router.lr or tc.lr})
    # fused: one kernel per step, and it takes the skip verdict as a device tensor (`train_step`)
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), fused=True)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper steps it once per process).
    scheduler = make_scheduler(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    if sharded:
        optimizer = accelerator.prepare(optimizer)
    else:
        student, optimizer = accelerator.prepare(student, optimizer)
    ema = EMA(unwrap(student), tc.ema_decay) if tc.ema_decay else None
    return Training(cfg, accelerator, teacher, student, heads, objective, optimizer, scheduler, ema, attn)


def build_objective(
    cfg: Config, teacher, student_tok, teacher_tok, heads, sources, device_type: str = "cpu"
) -> DistillObjective:
    """The objective: KD from the live `teacher` model, or from the teacher cache when the config names one
    (then `teacher` is None), with the auxiliary losses when `heads` are given."""
    if cfg.teacher is None:
        return DistillObjective()
    settings = KDSettings.of(cfg.distill)
    if teacher is not None:
        source = LiveTeacher(teacher, logit_kd(settings, teacher_tok, student_tok))
    else:
        source = TopKTeacher(top_k_kd(settings, teacher_tok, student_tok))
    chunking = Chunking(cfg.distill.chunk_size, cfg.distill.chunk_logits_on(device_type))
    aux = None
    if heads is not None:
        d = cfg.distill
        aux = AuxiliaryLosses(heads, sources, source, chunking, d.attention_loss, d.contrastive_temperature)
    likelihood = chunk_likelihood(cfg, teacher is not None, same_vocabulary(teacher_tok, student_tok))
    return DistillObjective(source, chunking, aux, likelihood)


CHUNK_LIKELIHOOD_WEIGHT = 1.0  # the default across tokenizers (`sakd ablate`'s table in the README)


def chunk_likelihood(cfg: Config, live: bool, one_vocabulary: bool) -> ChunkLikelihood | None:
    """The chunk-likelihood term the config asks for (None: off); `distill.chunk_likelihood_weight` null
    means on across tokenizers with the live teacher."""
    weight = cfg.distill.chunk_likelihood_weight
    if weight is None:
        weight = CHUNK_LIKELIHOOD_WEIGHT if live and not one_vocabulary else 0.0
    elif weight > 0 and not live:
        raise UserError(
            "distill.chunk_likelihood_weight needs the live teacher: a teacher cache holds only its top-k "
            "at group ends, not the log-probability of each of its tokens (set it to 0 or null)"
        )
    return ChunkLikelihood(weight, cfg.distill.chunk_likelihood_temperature) if weight > 0 else None


def chunk_likelihood_configured(cfg: Config) -> bool:
    """Whether training with the live teacher runs the chunk-likelihood term, as `chunk_likelihood` decides
    (both tokenizers are read only when the weight is left to its default)."""
    one_vocabulary = False  # an explicit weight does not depend on it
    if cfg.distill.chunk_likelihood_weight is None:
        roles = ("teacher", "student")
        one_vocabulary = same_vocabulary(*(load_tokenizer(getattr(cfg, r).tokenizer_path, r) for r in roles))
    return chunk_likelihood(cfg, live=True, one_vocabulary=one_vocabulary) is not None


def check_heads(t: Training, batch: Batch) -> None:
    """Before the first step: each model's own logits against sakd's head on a probe of the first real batch
    (`check_head`), for the student and the live teacher (a cache was captured by the same head)."""
    for role, model in (("student", t.student), ("teacher", t.teacher)):
        if model is not None:
            side = batch.side(role)
            with t.accelerator.autocast():  # the precision the step computes both heads in
                check_head(model, side.input_ids, side.attention_mask, role)


def step_batches(
    host_batches: list[Batch],
    accelerator: Accelerator,
    prepared: list[Batch] | None = None,
) -> StepBatches:
    """Token counts from the host copies (nothing waits for the device), and the batches on the device
    (`prepared`: already made by `prepare_batch`)."""
    tokens = sum(int(b.student.attention_mask.sum()) for b in host_batches)
    counts, tokens = global_counts(TokenCounts.of(host_batches), tokens, accelerator)
    return StepBatches(
        prepared if prepared is not None else [prepare_batch(b, accelerator.device) for b in host_batches],
        counts,
        tokens,
        [int(i) for b in host_batches for i in b.window_index],
    )


def train_step(t: Training, step: StepBatches, point: CurriculumPoint) -> StepResult:
    """One optimizer step over `grad_accum` micro-batches. Loss sums are normalised by the token counts of the
    whole step over all processes. A step whose loss or gradient norm is not finite on any process is skipped
    on every process, decided on the device: the optimizer gets the verdict as its `found_inf` (as a
    GradScaler hands it over) and the EMA update gets weight 0, so the host never waits for the device here."""
    accelerator, student = t.accelerator, t.student
    loss_sum = torch.zeros((), device=accelerator.device)
    parts_sum: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(step.batches):
        last = i == len(step.batches) - 1
        # FSDP2 (no `no_sync`): reduce-scatter the gradients on the last micro-batch only
        if hasattr(student, "set_requires_gradient_sync"):
            student.set_requires_gradient_sync(last)
        with accelerator.no_sync(student) if not last else nullcontext(), accelerator.autocast():
            norm = LossNorm(step.counts, accelerator.num_processes, len(step.batches))
            loss, parts = t.objective(student, batch, point, norm)
        accelerator.backward(loss)
        loss_sum += loss.detach()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0) + v.detach()
    if t.heads is not None:
        average_gradients(t.heads, accelerator)
    params = [p for g in t.optimizer.param_groups for p in g["params"]]
    # (with a GradScaler this unscales the gradients: an overflow makes the norm non-finite)
    grad_norm = full_tensor(accelerator.clip_grad_norm_(params, t.cfg.train.max_grad_norm or math.inf))
    stepped = all_finite(loss_sum, grad_norm, accelerator)
    optimizer = getattr(t.optimizer, "optimizer", t.optimizer)  # accelerate's wrapper would read the scale
    optimizer.found_inf = (~stepped).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    if accelerator.scaler is not None:
        accelerator.scaler.update()  # lowers the scale after an overflow found when unscaling
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update(unwrap(student), stepped)
    return StepResult(loss_sum, parts_sum, grad_norm, stepped)


def prepare_batch(batch: Batch, device: torch.device) -> Batch:
    """A host batch for the objective, on the device: its loss rows added (`loss_rows`), and attention masks
    without padding left out (transformers would otherwise check them, which waits for the device). On a GPU
    the host tensors are pinned first, so that copying them does not wait for the device either."""
    out = replace(
        with_loss_rows(batch),
        student=_without_full_mask(batch.student),
        teacher=_without_full_mask(batch.teacher) if batch.teacher is not None else None,
    )
    if device.type == "cuda":
        out = out.pin_memory()
    return to_device(out, device)


def _without_full_mask(side: Side) -> Side:
    mask = side.attention_mask
    return replace(side, attention_mask=None) if mask is not None and bool(mask.all()) else side


def to_device(batch: Batch, device: torch.device) -> Batch:
    return batch.to(device, non_blocking=True)
