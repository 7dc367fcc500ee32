"""The memory model of `sakd plan`: the device memory a run needs, per device, and a batch size that fits a
given device.

Data parallelism replicates everything, so the estimate is per device whatever the number of processes:

- teacher weights: P_t x bytes of the teacher's dtype (frozen: no gradients, no optimizer state);
- student: P_s x 16 B (fp32 master weights 4, fp32 gradients 4, AdamW's two moments 8), + 4 B per parameter
  for the EMA copy when `train.ema_decay` is set, + 2 B per parameter for the 16-bit copies autocast keeps
  during a forward (mixed precision only); the router and projection heads at 16 B per parameter. A LoRA
  student (`student.lora`) keeps its frozen weights at 4 B per parameter and only its P_a adapter parameters
  at 16 B (+ 4 B of EMA); their r-wide activations are not counted;
- student activations kept for backward, per micro-batch of b windows of s tokens:
  b x s x (L x (A x (10 h + 4 f) + [eager attention] 6 x heads x s) + 8 h) bytes, with A the activation
  width (2 B in 16-bit autocast, 4 B in fp32). Per layer and token a Llama-style block keeps about ten
  h-wide tensors (the two norms' inputs and outputs, q/k/v, the attention output, the residual) and four
  f-wide ones of the gated MLP (gate, up, act(gate), their product); eager attention also keeps the
  (heads x s) scores and probabilities (6 B: fp32 softmax and its 16-bit copy); sdpa keeps none. 8 h: the
  embedding output and the final hidden state in fp32;
- teacher forward (no grad): its final hidden state and the aligned teacher rows, + the knowledge sources
  (E experts per token) when the router's feature or balance loss is on: b x s x (E + 3) x h_t x bytes;
- the loss: the chunked loss never holds the (tokens x vocabulary) logits, only one chunk of rows at a time:
  rows x (4 V_s + 3 V_t) x 4 B (student logits, log-probabilities, their gradient and the teacher's
  distribution on the student vocabulary; teacher logits, log-probabilities, probabilities; one more V_s for
  the chunk-likelihood term when it runs), + V_s x h_s x 4 for the head gradient accumulated in fp32 (none
  for a LoRA student, whose head is frozen).

Not counted: the CUDA context and allocator fragmentation (a headroom of 15% of the device is kept free),
and cuDNN / matmul workspaces. Parameter counts are exact (the models are built on the meta device from
their configs); the activation formula is an estimate (tests/distributed/test_plan.py compares it with a
measurement).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from sakd.config import Config
from sakd.curriculum import AUX_LOSSES
from sakd.errors import UserError
from sakd.losses.chunked import HIDDEN_PER_ROW, chunk_rows
from sakd.train.step import chunk_likelihood_configured

GIB = 1024**3
HEADROOM = 0.15


@dataclass
class ModelShape:
    """What the memory estimate needs to know of a model, read from its config."""

    ref: str
    params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    experts: int = 0

    @staticmethod
    def read(ref: str, role: str) -> tuple[ModelShape, nn.Module]:
        """The shape and a meta-device instance (no weights read or allocated) of the model at `ref`."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from sakd.models.gguf import pretrained_args

        name, gguf = pretrained_args(ref)
        try:
            config = AutoConfig.from_pretrained(name, **gguf)
        except (OSError, ValueError) as e:
            reason = str(e).splitlines()[0][:160]
            raise UserError(
                f"cannot read the {role} config from '{ref}' ({type(e).__name__}: {reason}): give a local "
                f"folder with a config.json, or run where the hub is reachable"
            ) from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        text = config.get_text_config()
        shape = ModelShape(
            ref=ref,
            params=sum(p.numel() for p in model.parameters()),
            hidden=text.hidden_size,
            intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            vocab=model.get_output_embeddings().weight.shape[0],
            experts=getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0,
        )
        return shape, model


@dataclass
class Plan:
    """Bytes per device, by part, for micro-batches of `batch_size` windows of `seq_len` tokens."""

    precision: str
    batch_size: int
    seq_len: int
    parts: dict[str, int]
    formulas: dict[str, str]
    per_window: int
    """Bytes each extra window of a micro-batch adds (activations, teacher forward)."""
    teacher: ModelShape | None = None
    student: ModelShape | None = None
    device: str = "cuda"
    """Where the run trains: "cuda" (device memory) or "cpu" (the process's resident memory)."""
    device_memory: int | None = None
    suggestion: dict[str, Any] = field(default_factory=dict)
    processes: int = 1
    placement: str | None = None

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total}


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


PLACEMENTS = ("replicate", "shard", "offload")


def _teacher_weights(teacher: ModelShape, placement: str, processes: int, t_bytes: int) -> tuple[int, str]:
    """Device bytes of the teacher's weights under a placement: all of them, a 1/processes shard plus the one
    layer FSDP gathers for its forward, or (offload) one layer at a time plus the embeddings and head."""
    layer = (teacher.params - 2 * teacher.vocab * teacher.hidden) // max(teacher.layers, 1)
    embeddings = 2 * teacher.vocab * teacher.hidden
    if placement == "shard" and processes > 1:
        size = math.ceil(teacher.params / processes) + layer
        return size * t_bytes, f"{teacher.params:,} params / {processes} + one layer {layer:,}, x {t_bytes} B"
    if placement == "offload":
        return (
            layer + embeddings
        ) * t_bytes, f"one layer {layer:,} + embeddings and head {embeddings:,}, x {t_bytes} B"
    return teacher.params * t_bytes, f"{teacher.params:,} params x {t_bytes} B"


DEVICES = ("cuda", "cpu")
# What a CPU training process holds before any model: Python, torch, transformers and sakd's training code
# (the resident size after importing them, measured on Linux x86-64 with torch 2.13: about 340 MiB).
CPU_RUNTIME = 400 * 1024**2


@dataclass
class _Models:
    """The run's models and what follows from them for the estimate."""

    student: ModelShape
    student_model: nn.Module
    teacher: ModelShape | None
    teacher_model: nn.Module | None
    runs_teacher: bool
    eager: bool
    adapters: int | None = None  # a LoRA student's trainable parameters (None: full fine-tuning)
    chunk_likelihood: bool = False  # the chunk-likelihood term runs (one more (rows x V_s) tensor per chunk)


def _read_models(cfg: Config) -> _Models:
    from sakd.models.attention import attention_implementation

    full = cfg.curriculum.weights
    needs_maps = cfg.teacher is not None and full.attention > 0
    eager = attention_implementation(needs_maps, cfg.student.attn_implementation) == "eager"
    student, student_model = ModelShape.read(cfg.student.model, "student")
    teacher = teacher_model = None
    if cfg.teacher is not None:
        teacher, teacher_model = ModelShape.read(cfg.teacher.model, "teacher")
    # With a teacher cache the teacher is not loaded: its top-k distributions are read from disk.
    runs_teacher = teacher is not None and not getattr(cfg.teacher, "cache", None)
    likelihood = runs_teacher and chunk_likelihood_configured(cfg)
    return _Models(student, student_model, teacher, teacher_model, runs_teacher, eager, None, likelihood)


def _adapter_params(cfg: Config, student_model: nn.Module, shards: int) -> int | None:
    """The trainable parameters of a LoRA student (None: full fine-tuning), counted by adapting the meta model."""
    from sakd.models.lora import apply_lora, lora_parameter_count

    if cfg.student.lora is None:
        return None
    if shards > 1:  # training refuses a sharded LoRA student: so does the plan, with the same error
        apply_lora(student_model, cfg.student.lora, sharded=True)
    return lora_parameter_count(student_model, cfg.student.lora)


def _student_state(
    parts: dict[str, int],
    formulas: dict[str, str],
    params: int,
    adapters: int | None,
    shards: int,
    ema: bool,
    act: int,
) -> None:
    """The student's weights, gradients, AdamW state, EMA and autocast copies. A LoRA student (`adapters`
    trainable parameters) keeps its frozen weights in fp32 without gradients, optimizer state or EMA."""
    per = f" / {shards} processes (fsdp)" if shards > 1 else ""
    if adapters is None:
        parts["student weights, grads, AdamW"] = math.ceil(params / shards) * 16
        formulas["student weights, grads, AdamW"] = f"{params:,} params{per} x 16 B (fp32 4 + 4 + 8)"
    else:
        parts["student frozen weights"] = params * 4
        formulas["student frozen weights"] = f"{params:,} params x 4 B (fp32, no grads or AdamW state)"
        parts["LoRA adapters, grads, AdamW"] = adapters * 16
        formulas["LoRA adapters, grads, AdamW"] = f"{adapters:,} params x 16 B (fp32 4 + 4 + 8)"
    trained = params if adapters is None else adapters
    if ema:
        parts["student EMA"] = math.ceil(trained / shards) * 4
        formulas["student EMA"] = f"{trained:,} params{per} x 4 B"
    if act == 2:
        total = params + (adapters or 0)
        parts["autocast 16-bit weights"] = total * 2
        formulas["autocast 16-bit weights"] = f"{total:,} params x 2 B"


def estimate(
    cfg: Config,
    precision: str | None = None,
    device_memory: int | None = None,
    processes: int = 1,
    placement: str | None = None,
    device: str = "cuda",
) -> Plan:
    """The per-device memory of `cfg` (train.precision unless `precision`; 'auto' counts as 16-bit, what it
    gives on a GPU, or as fp32 with `device` "cpu"), and with `device_memory` the largest micro-batch that
    fits and the accumulation that keeps the config's windows per optimizer step. On the CPU the process's
    runtime counts too: the estimate is then of the peak resident size."""
    if device not in DEVICES:
        raise UserError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    precision = precision or cfg.train.precision
    if device == "cpu" and precision == "auto":
        precision = "fp32"  # what `auto` resolves to on the CPU
    m = _read_models(cfg)
    m.adapters = _adapter_params(cfg, m.student_model, processes if cfg.train.strategy == "fsdp" else 1)
    t_bytes = _bytes(cfg.teacher.dtype if cfg.teacher and cfg.teacher.dtype != "auto" else precision)
    placement = placement or (cfg.teacher.placement if cfg.teacher is not None else "replicate")
    parts, formulas = _fixed_parts(cfg, m, precision, processes, placement, t_bytes)
    if device == "cpu":
        parts["runtime (Python, torch, libraries)"] = CPU_RUNTIME
        formulas["runtime (Python, torch, libraries)"] = "resident size after the imports, a constant"
    chunk_logits = cfg.distill.chunk_logits_on(device)
    per_window, batch_parts = _batch_costs(cfg, m, precision, t_bytes, chunk_logits, formulas)
    batch = cfg.train.batch_size
    plan = Plan(precision, batch, cfg.data.max_length, {**parts, **batch_parts(batch)}, formulas, per_window)
    plan.teacher, plan.student, plan.device = m.teacher, m.student, device
    plan.processes, plan.placement = processes, placement if m.runs_teacher else None
    if device_memory is None:
        return plan
    if m.runs_teacher and cfg.teacher is not None and placement == cfg.teacher.placement:
        # The cheapest placement (in device time) whose plan fits one window: replicate, shard, offload.
        for option in PLACEMENTS:
            if option == "shard" and processes < 2:
                continue
            trial = estimate(cfg, precision, None, processes, option, device)
            if trial.total - sum(batch_parts(batch).values()) + sum(batch_parts(1).values()) <= int(
                device_memory * (1 - HEADROOM)
            ):
                if option != placement:
                    return estimate(cfg, precision, device_memory, processes, option, device)
                break
    _suggest(plan, cfg, parts, batch_parts, device_memory, m.runs_teacher, placement)
    return plan


def _fixed_parts(
    cfg: Config, m: _Models, precision: str, processes: int, placement: str, t_bytes: int
) -> tuple[dict[str, int], dict[str, str]]:
    """The parts that do not grow with the micro-batch: weights, gradients, optimizer state, EMA, heads."""
    from sakd.train.auxiliary import build_heads

    parts: dict[str, int] = {}
    formulas: dict[str, str] = {}
    student, teacher = m.student, m.teacher
    if m.runs_teacher:
        parts["teacher weights"], formulas["teacher weights"] = _teacher_weights(
            teacher, placement, processes, t_bytes
        )
    # FSDP keeps 1/processes of the student's weights, gradients, AdamW state and EMA on each device.
    shards = processes if cfg.train.strategy == "fsdp" and processes > 1 else 1
    ema = bool(cfg.train.ema_decay)
    _student_state(parts, formulas, student.params, m.adapters, shards, ema, _bytes(precision))
    full = cfg.curriculum.weights
    if teacher is not None and any(getattr(full, k) > 0 for k in AUX_LOSSES):
        with torch.device("meta"):
            heads, _ = build_heads(
                m.student_model,
                m.teacher_model,
                cfg.router,
                cfg.distill.layer_map,
                cfg.distill.layerwise_pairs,
            )
        head_params = sum(p.numel() for p in heads.parameters())
        parts["router and projection heads"] = head_params * 16
        formulas["router and projection heads"] = f"{head_params:,} params x 16 B"
    return parts, formulas


def _batch_costs(
    cfg: Config, m: _Models, precision: str, t_bytes: int, chunk_logits: int, formulas: dict[str, str]
):
    """(bytes per window, a function of the micro-batch giving the parts that grow with it); fills in their
    formulas."""
    act, s, student, teacher = _bytes(precision), cfg.data.max_length, m.student, m.teacher
    h, f, layers = student.hidden, student.intermediate, student.layers
    per_token_layer = act * (10 * h + 4 * f) + (6 * student.heads * s if m.eager else 0)
    student_window = s * (layers * per_token_layer + 8 * h)
    formulas["student activations"] = (
        f"b x s x (L x ({act} x (10 h + 4 f){' + 6 x heads x s' if m.eager else ''}) + 8 h) with s={s}, "
        f"L={layers}, h={h}, f={f}{f', heads={student.heads}' if m.eager else ''}"
    )
    teacher_window = 0
    full = cfg.curriculum.weights
    if m.runs_teacher:
        sources = 0
        if full.router > 0 or full.balance > 0:
            sources = teacher.experts or cfg.router.num_sources
        teacher_window = s * (sources + 3) * teacher.hidden * t_bytes
        formulas["teacher forward"] = f"b x s x ({sources} sources + 3) x {teacher.hidden} x {t_bytes} B"
    t_vocab = teacher.vocab if teacher is not None else 0
    widest = max(h, teacher.hidden if teacher is not None else 0)  # the head a chunk's floor follows

    def batch_parts(batch: int) -> dict[str, int]:
        rows = min(
            chunk_rows(cfg.distill.chunk_size, chunk_logits, max(student.vocab, t_vocab), widest),
            batch * s,
        )
        out = {"student activations": batch * student_window}
        if m.runs_teacher:
            out["teacher forward"] = batch * teacher_window
        head_grad = student.vocab * h * 4 if m.adapters is None else 0  # a LoRA student's head is frozen
        student_columns = (5 if m.chunk_likelihood else 4) * student.vocab
        out["loss (one chunk)"] = rows * (student_columns + 3 * t_vocab) * 4 + head_grad
        return out

    head_term = f" + {student.vocab} x {h} x 4 B" if m.adapters is None else ""
    formulas["loss (one chunk)"] = (
        f"min(chunk rows, b x s) x ({5 if m.chunk_likelihood else 4} x {student.vocab} + 3 x {t_vocab}) x 4 B"
        f"{head_term}, chunk rows = min(chunk_size {cfg.distill.chunk_size}, chunk_logits "
        f"{chunk_logits} / widest vocabulary), at least widest hidden {widest} / {HIDDEN_PER_ROW}"
    )
    return student_window + teacher_window, batch_parts


def _suggest(
    plan: Plan, cfg: Config, parts, batch_parts, device_memory: int, runs_teacher, placement
) -> None:
    """The largest power-of-two micro-batch that fits `device_memory`, and the accumulation that keeps the
    config's windows per optimizer step."""
    plan.device_memory = device_memory
    usable = int(device_memory * (1 - HEADROOM))
    fixed = sum(parts.values())
    fits = [b for b in range(1, 1025) if fixed + sum(batch_parts(b).values()) <= usable]
    windows_per_step = cfg.train.batch_size * cfg.train.grad_accum
    if not fits:
        plan.suggestion = {"fits": False, "advice": _advice(plan, fixed, usable)}
        return
    best = min(max(fits), windows_per_step)
    best = 1 << (best.bit_length() - 1)  # a power of two divides the usual batch sizes
    accum = math.ceil(windows_per_step / best)
    plan.suggestion = {
        "fits": True,
        "batch_size": best,
        "grad_accum": accum,
        "windows_per_step": best * accum,
        "largest_batch_that_fits": max(fits),
        "total_at_suggestion": fixed + sum(batch_parts(best).values()),
        "teacher_placement": placement if runs_teacher else None,
    }


def _advice(plan: Plan, fixed: int, usable: int) -> str:
    tips = []
    if plan.parts.get("teacher weights", 0) >= 0.5 * usable:
        tips.append(
            "the teacher's weights alone take half the device: use teacher.dtype fp16/bf16 if it is fp32, "
            "teacher.placement: shard (over several processes) or offload (host memory)"
        )
    if "student EMA" in plan.parts:
        tips.append("train.ema_decay: null saves the EMA copy")
    tips.append("lower data.max_length or distill.chunk_logits")
    return (
        f"even one window does not fit: {size_text(fixed).strip()} before activations, "
        f"{size_text(usable).strip()} usable; " + "; ".join(tips)
    )


def size_text(n: int) -> str:
    return f"{n / GIB:8.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:8.2f} MiB"
