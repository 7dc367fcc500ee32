"""The training loop: distil a frozen teacher into a student on HF Accelerate.

One optimizer step = `grad_accum` micro-batches per process. Loss sums are divided by the token counts of the
whole step over all processes, so batch 4 x accumulation 1 equals batch 2 x accumulation 2. A step whose loss
or gradient is not finite is skipped on every process and counted. The run can be killed at any point and
resumed from its newest complete checkpoint with the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, parse_flag_from_env, set_seed
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from tqdm.auto import tqdm

from sakd.cache.training import open_training_cache, teacher_skeleton
from sakd.config import Config
from sakd.curriculum import CurriculumPoint, curriculum_at, training_progress
from sakd.data.corpus import build_windows
from sakd.data.loader import WindowLoader
from sakd.errors import UserError
from sakd.eval.metrics import lm_metrics
from sakd.models.attention import attention_implementation
from sakd.models.load import freeze, load_model, load_tokenizer, resolve_precision, unwrap, weights_dtype
from sakd.report import build_report
from sakd.report.trackers import MetricsWriter
from sakd.train import checkpoint, rundir
from sakd.train.ema import EMA
from sakd.train.objective import DistillObjective, TokenCounts, build_heads
from sakd.train.schedule import make_scheduler

log = logging.getLogger("sakd")


class TrainingStopped(Exception):
    """Training ended before max_steps for a reason the user must see (exit status `code`)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@dataclass
class LoopState:
    """Counters saved in every checkpoint."""

    step: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    best_bpb: float | None = None
    evals_without_improvement: int = 0
    recent_skips: list[int] = field(default_factory=list)
    skipped_batches: list[list[int]] = field(default_factory=list)


class _NoWriter:
    """Processes other than the main one log nothing."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean stop at the next step boundary; a second SIGINT
    interrupts at once (and the emergency checkpoint of the last finished step is written)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def curriculum_point(cfg: Config, step: int) -> CurriculumPoint:
    """Loss weights, temperature and top-k at an optimizer step; the same function serves training and
    evaluation (FAILURE_MODES 5)."""
    return curriculum_at(training_progress(step, cfg.train.max_steps), cfg.curriculum)


def train(cfg: Config, resume: str | None = None, force: bool = False) -> dict[str, Any]:
    # The first PartialState decides the backend: without ACCELERATE_USE_CPU, torchrun's CPU workers
    # would each train alone.
    distributed = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = rundir.prepare(cfg, resume, force, distributed.num_processes)
    tc = cfg.train
    precision = resolve_precision(tc.precision, distributed.device)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision)
    main = accelerator.is_main_process
    set_seed(tc.seed)

    student_tok = load_tokenizer(cfg.student.tokenizer_path, "student")
    teacher_tok = load_tokenizer(cfg.teacher.tokenizer_path, "teacher") if cfg.teacher else None
    bar = tqdm(total=2 if cfg.data.eval else 1, desc="tokenizing", disable=not (main and tc.progress))
    windows = build_windows(cfg.data.train, student_tok, teacher_tok, cfg.data.max_length)
    bar.update()
    eval_windows = []
    if cfg.data.eval:
        eval_windows = build_windows(
            cfg.data.eval, student_tok, teacher_tok, cfg.data.max_length, cfg.data.eval_max_windows
        )
        bar.update()
    bar.close()
    per_step = tc.batch_size * accelerator.num_processes
    if len(windows) < per_step:
        raise UserError(
            f"the training data gives {len(windows)} windows of {cfg.data.max_length} tokens, fewer than one "
            f"batch ({per_step}): add data or lower train.batch_size / data.max_length"
        )

    teacher = cached = None
    full = cfg.curriculum.weights
    needs_maps = cfg.teacher is not None and full.attention > 0
    if cfg.teacher and cfg.teacher.cache:  # the cache replaces the teacher, which is not loaded
        cached = open_training_cache(
            cfg.teacher.cache,
            windows,
            cfg.data.train,
            cfg.data.max_length,
            cfg.teacher.model,
            student_tok,
            teacher_tok,
        )
    elif cfg.teacher:
        teacher_dtype = cfg.teacher.dtype if cfg.teacher.dtype != "auto" else precision
        attn = attention_implementation(needs_maps, cfg.teacher.attn_implementation)
        teacher = freeze(load_model(cfg.teacher.model, "teacher", weights_dtype(teacher_dtype), attn))
        teacher.to(accelerator.device)
    # Trainable weights stay fp32 (master weights); mixed precision comes from autocast and a GradScaler.
    student = load_model(
        cfg.student.model,
        "student",
        torch.float32,
        attention_implementation(needs_maps, cfg.student.attn_implementation),
        random_init=cfg.student.init == "random",
        seed=tc.seed,
    )
    student.train()
    heads = sources = None
    aux_names = ("feature", "attention", "router", "balance", "layerwise", "contrastive", "token_weighting")
    if (teacher is not None or cached is not None) and any(getattr(full, k) > 0 for k in aux_names):
        heads, sources = build_heads(
            student,
            teacher if teacher is not None else teacher_skeleton(cfg.teacher.model),
            cfg.router,
            cfg.distill.layer_map,
            cfg.distill.layerwise_pairs,
        )
        heads.to(accelerator.device)
    objective = DistillObjective(
        teacher_tok,
        student_tok,
        cfg.distill.divergence,
        cfg.distill.jsd_beta,
        cfg.distill.cross_vocab,
        cfg.distill.chunk_size,
        heads,
        sources,
        cfg.distill.attention_loss,
        cfg.distill.contrastive_temperature,
        cached=cached is not None,
    )
    groups = _param_groups(student, tc.weight_decay)
    if heads is not None:
        groups.append({"params": list(heads.parameters()), "weight_decay": 0.0, "lr": cfg.router.lr or tc.lr})
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), fused=False, foreach=False)
    # The scheduler is stepped by hand once per optimizer step (accelerate's wrapper steps it once per process).
    scheduler = make_scheduler(optimizer, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
    student, optimizer = accelerator.prepare(student, optimizer)
    ema = EMA(unwrap(student), tc.ema_decay) if tc.ema_decay else None
    loader = WindowLoader(
        windows,
        tc.batch_size,
        tc.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        student_pad_id=student_tok.pad_token_id,
        teacher_pad_id=teacher_tok.pad_token_id if teacher_tok else None,
    )
    if cached is not None:
        loader = cached.batches(loader)
    state = LoopState()
    ckpt_root = out / "checkpoints"

    def save(tag: str = "", collective: bool = True) -> Path:
        path = save_checkpoint(
            ckpt_root,
            accelerator,
            student,
            heads,
            optimizer,
            scheduler,
            ema,
            loader,
            state,
            tc.keep_last,
            collective,
        )
        if main:
            log.info("checkpoint%s saved: %s", tag, path)
        return path

    start_path = checkpoint.resolve_resume(ckpt_root, resume) if resume else None
    if start_path is not None:
        load_checkpoint(start_path, accelerator, student, heads, optimizer, scheduler, ema, loader, state)
    writer: MetricsWriter | _NoWriter = _NoWriter()
    if main:
        environment = rundir.environment_snapshot(
            str(accelerator.device), precision, accelerator.num_processes
        )
        rundir.write_run_files(out, cfg, environment)
        wandb = (
            {"project": tc.wandb_project, "config": cfg.model_dump(mode="json")} if tc.wandb_project else None
        )
        writer = MetricsWriter(out, tensorboard=tc.tensorboard, wandb=wandb)
        if start_path is not None:
            writer.log({"event": "resume", "step": state.step, "from": str(start_path)})
    eval_batches = _eval_batches(eval_windows, tc.batch_size, student_tok, teacher_tok)

    def evaluate() -> dict[str, Any]:
        point = curriculum_point(cfg, state.step)
        result = evaluate_student(
            student, teacher, objective, eval_batches, point, accelerator, ema, main and tc.progress
        )
        result["step"] = state.step
        writer.log({"event": "eval", **result})
        if main:
            raw, ema_m = result["raw"], result.get("ema")
            ema_text = f", EMA {ema_m['bits_per_byte']:.4f}" if ema_m else ""
            log.info(
                "step %d: held-out bits per byte %.4f (raw)%s, perplexity %.2f",
                state.step,
                raw["bits_per_byte"],
                ema_text,
                raw["perplexity"],
            )
        return result

    desc = "distilling" if teacher is not None or cached is not None else "training (LM only)"
    bar = tqdm(total=tc.max_steps, initial=state.step, desc=desc, disable=not (main and tc.progress))
    last_eval: dict[str, Any] | None = None
    interval = _Interval()
    t_segment = time.perf_counter()
    elapsed_at_start = state.elapsed_s
    stop_reason = None
    boundary = (loader.state_dict(), checkpoint.rng_state())
    with StopFlag() as stop:
        try:
            while state.step < tc.max_steps:
                boundary = (loader.state_dict(), checkpoint.rng_state())
                batches = [_to(loader.next_batch(), accelerator.device) for _ in range(tc.grad_accum)]
                counts = _global_counts(TokenCounts.of(batches), accelerator)
                point = curriculum_point(cfg, state.step)
                loss_sum = torch.zeros((), device=accelerator.device)
                parts_sum: dict[str, torch.Tensor] = {}
                for i, batch in enumerate(batches):
                    last = i == len(batches) - 1
                    with accelerator.no_sync(student) if not last else nullcontext(), accelerator.autocast():
                        loss, parts = objective(
                            student, teacher, batch, point, counts, accelerator.num_processes, len(batches)
                        )
                    accelerator.backward(loss)
                    loss_sum += loss.detach()
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0) + v.detach()
                if heads is not None:
                    _average_gradients(heads, accelerator)
                params = [p for g in optimizer.param_groups for p in g["params"]]
                grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm or math.inf)
                finite = _all_finite(loss_sum, grad_norm, accelerator)
                if finite:
                    optimizer.step()
                    stepped = not accelerator.optimizer_step_was_skipped
                elif accelerator.scaler is not None:
                    optimizer.step()  # the GradScaler skips it and lowers its scale
                    stepped = False
                else:
                    stepped = False
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if stepped and ema is not None:
                    ema.update(unwrap(student))
                state.step += 1
                boundary = (loader.state_dict(), checkpoint.rng_state())
                state.recent_skips = (state.recent_skips + [0 if stepped else 1])[-tc.nonfinite_window :]
                tokens = _global_sum(
                    sum(int(b["student_attention_mask"].sum()) for b in batches), accelerator
                )
                state.tokens_seen += tokens
                state.elapsed_s = elapsed_at_start + time.perf_counter() - t_segment
                loss_sum, parts_sum = _global_losses(loss_sum, parts_sum, accelerator)
                if not stepped:
                    state.skipped_steps += 1
                    ids = _window_ids(batches, accelerator)
                    state.skipped_batches = (state.skipped_batches + [[state.step, *ids]])[-100:]
                    if main:
                        writer.log(
                            {
                                "event": "skip",
                                "step": state.step,
                                "windows": ids,
                                "loss": float(loss_sum),
                                "grad_norm": float(grad_norm),
                            },
                        )
                interval.add(loss_sum, parts_sum, tokens, grad_norm if stepped else None)
                bar.update()
                if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                    record = interval.flush(state, scheduler.get_last_lr()[0], point)
                    if main:
                        writer.log(record)
                        bar.set_postfix(
                            loss=f"{record['loss']:.3f}",
                            lr=f"{record['lr']:.2e}",
                            phase=point.phase,
                            tok_s=f"{record['tokens_per_s']:.0f}",
                        )
                skip_limit = tc.nonfinite_max_rate * tc.nonfinite_window
                if state.skipped_steps and sum(state.recent_skips) > skip_limit:
                    save(" (non-finite stop)")
                    raise TrainingStopped(
                        f"{sum(state.recent_skips)} of the last {len(state.recent_skips)} steps had a non-finite "
                        "loss or gradient (skipped windows are listed in metrics.jsonl); likely causes: a learning "
                        "rate too high, fp16 overflow (use bf16 or fp32), a teacher that outputs NaN/inf, or bad "
                        f"data. The newest checkpoint is in {ckpt_root}"
                    )
                if (
                    eval_batches
                    and tc.eval_every
                    and state.step % tc.eval_every == 0
                    and state.step < tc.max_steps
                ):
                    last_eval = evaluate()
                    if _agree_max(int(_early_stop(state, last_eval, tc)), accelerator):
                        stop_reason = "early stop"
                if tc.save_every and state.step % tc.save_every == 0 and state.step < tc.max_steps:
                    save()
                signum = _agree_max(stop.signum, accelerator)
                if signum:
                    save(" (emergency)")
                    name = signal.Signals(signum).name
                    raise TrainingStopped(
                        f"stopped by {name} at step {state.step}; a checkpoint is in {ckpt_root}: resume with "
                        "`sakd train CONFIG --resume auto`",
                        code=128 + signum,
                    )
                if tc.max_minutes and _agree_max(int(state.elapsed_s > 60 * tc.max_minutes), accelerator):
                    stop_reason = f"time budget of {tc.max_minutes} minutes spent"
                if stop_reason:
                    break
        except (Exception, KeyboardInterrupt) as exc:
            if isinstance(exc, TrainingStopped):
                raise
            if state.step > 0:
                try:
                    # Back to the last step boundary, so that the checkpoint matches the weights. The other
                    # processes may be dead or stuck in a collective: the main process saves alone.
                    loader.load_state_dict(boundary[0])
                    checkpoint.set_rng_state(boundary[1])
                    save(" (emergency)", collective=False)
                except Exception:  # the original failure matters more than a failed emergency save
                    log.exception("emergency checkpoint failed")
            raise
        finally:
            bar.close()
            writer.flush()

    final_eval = evaluate() if eval_batches else None
    save()
    export = export_final(out, student, ema, student_tok, final_eval, accelerator)
    summary = {
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens_seen": state.tokens_seen,
        "elapsed_s": round(state.elapsed_s, 2),
        "stop_reason": stop_reason or "max_steps",
        "objective": objective.kind,
        "teacher_cache": cached.coverage if cached is not None else None,
        "final": export,
        "eval": final_eval,
        "last_periodic_eval": last_eval,
    }
    writer.log({"event": "end", **summary})
    writer.close()
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        try:
            build_report(out)
        except Exception:  # a failed report must not fail a finished run
            log.warning("the run report could not be built", exc_info=True)
    accelerator.wait_for_everyone()
    return summary


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and embeddings' 1-d parameters."""
    decay, no_decay = [], []
    for _name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _average_gradients(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """The heads are not wrapped in DDP: average their gradients over processes by hand."""
    if accelerator.num_processes == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def _global_counts(counts: TokenCounts, accelerator: Accelerator) -> TokenCounts:
    if accelerator.num_processes == 1:
        return counts
    t = accelerator.reduce(torch.tensor([counts.lm, counts.kd], device=accelerator.device), reduction="sum")
    return TokenCounts(int(t[0]), int(t[1]))


def _global_sum(value: int, accelerator: Accelerator) -> int:
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum"))


# Batch-level loss parts are per-process means (averaged by DDP); the token-level ones are shares of sums over
# all processes.
_BATCH_LEVEL_PARTS = ("balance", "contrastive")


def _global_losses(
    loss: torch.Tensor, parts: dict[str, torch.Tensor], accelerator: Accelerator
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss and parts over all processes, for the logs: each process's loss is scaled by the number
    of processes (DDP averages gradients), so the global loss is the mean; token-level parts are summed."""
    n = accelerator.num_processes
    if n == 1:
        return loss, parts
    names = sorted(parts)
    total = accelerator.reduce(torch.stack([loss.float(), *(parts[k].float() for k in names)]), "sum")
    global_parts = {k: total[i + 1] / (n if k in _BATCH_LEVEL_PARTS else 1) for i, k in enumerate(names)}
    return total[0] / n, global_parts


def _window_ids(batches: list[dict[str, torch.Tensor]], accelerator: Accelerator) -> list[int]:
    """The windows of a step on every process (in rank order): the identity of a skipped step."""
    ids = [int(i) for b in batches for i in b["window_index"]]
    return ids if accelerator.num_processes == 1 else gather_object(ids)


def _agree_max(value: int, accelerator: Accelerator) -> int:
    """All processes take the same decision (stop, skip): the largest of their values."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="max"))


def _all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, accelerator: Accelerator) -> bool:
    """Gradients are already all-reduced (same norm everywhere); losses differ per process, so agree on them."""
    bad = int(not (torch.isfinite(loss) and torch.isfinite(torch.as_tensor(grad_norm))))
    return not _agree_max(bad, accelerator)


class _Interval:
    """Loss parts, tokens and time since the last log line, averaged per optimizer step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss = 0.0
        self.parts: dict[str, float] = {}
        self.tokens = 0
        self.grad_norm = None
        self.t0 = time.perf_counter()

    def add(self, loss, parts, tokens: int, grad_norm) -> None:
        self.steps += 1
        self.loss += float(loss)
        for k, v in parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + float(v)
        self.tokens += tokens
        if grad_norm is not None:
            self.grad_norm = float(grad_norm)

    def flush(self, state: LoopState, lr: float, point: CurriculumPoint) -> dict[str, Any]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        record = {
            "event": "train",
            "step": state.step,
            "lr": lr,
            "loss": self.loss / max(self.steps, 1),
            **{f"loss_{k}": v / max(self.steps, 1) for k, v in self.parts.items()},
            "grad_norm": self.grad_norm,
            "tokens_per_s": self.tokens / dt,
            "skipped_steps": state.skipped_steps,
            "elapsed_s": round(state.elapsed_s, 2),
            "phase": point.phase,
            "temperature": point.temperature,
            "top_k": point.top_k,
            **{f"weight_{k}": v for k, v in point.weights.items()},
        }
        self.reset()
        return record


def _early_stop(state: LoopState, result: dict[str, Any], tc) -> bool:
    bpb = result["best_bits_per_byte"]
    if state.best_bpb is None or bpb < state.best_bpb:
        state.best_bpb = bpb
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    return (
        tc.early_stop_patience is not None
        and state.evals_without_improvement >= tc.early_stop_patience
        and state.step >= tc.early_stop_min_steps
    )


def _eval_batches(windows, batch_size: int, student_tok, teacher_tok) -> list[dict[str, torch.Tensor]]:
    if not windows:
        return []
    loader = WindowLoader(
        windows,
        batch_size,
        seed=0,
        shuffle=False,
        drop_last=False,
        student_pad_id=student_tok.pad_token_id,
        teacher_pad_id=teacher_tok.pad_token_id if teacher_tok else None,
    )
    return list(loader)


@torch.no_grad()
def evaluate_student(
    student, teacher, objective, batches, point, accelerator, ema, progress: bool = False
) -> dict[str, Any]:
    """Held-out bits per byte and perplexity of the raw (and EMA) student, and the distillation loss with the
    same weights as training."""
    model = unwrap(student)
    device = accelerator.device
    chunk = objective.chunk_size
    result: dict[str, Any] = {
        "raw": lm_metrics(model, batches, "student", device, chunk, "evaluating (raw)" if progress else None)
    }
    if ema is not None:
        with ema.applied(model):
            result["ema"] = lm_metrics(
                model, batches, "student", device, chunk, "evaluating (EMA)" if progress else None
            )
    if teacher is not None and point.weights["kd"] > 0:
        model.eval()
        moved = [_to(b, device) for b in batches]
        counts = TokenCounts.of(moved)
        total = 0.0
        parts_sum: dict[str, float] = {}
        for b in moved:
            with accelerator.autocast():
                loss, parts = objective(model, teacher, b, point, counts, micro_batches=len(moved))
            total += float(loss)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
        model.train()
        result["distill_loss"] = total
        result["kd"] = parts_sum["kd"]
        result["parts"] = parts_sum
    result["best"] = (
        "ema"
        if "ema" in result and result["ema"]["bits_per_byte"] < result["raw"]["bits_per_byte"]
        else "raw"
    )
    result["best_bits_per_byte"] = result[result["best"]]["bits_per_byte"]
    return result


def save_checkpoint(
    root, accelerator, student, heads, optimizer, scheduler, ema, loader, state, keep_last, collective=True
) -> Path:
    """Every process writes its RNG state; the main process writes the rest. Never the teacher.
    Without `collective` (an emergency save after an exception) the main process writes it alone, with its
    own RNG state only; the other processes write nothing."""
    final = root / checkpoint.step_dir_name(state.step)
    if not collective and not accelerator.is_main_process:
        return final
    sync = accelerator.wait_for_everyone if collective else lambda: None
    sync()
    tmp = root / f".tmp-{checkpoint.step_dir_name(state.step)}"
    if accelerator.is_main_process:
        tmp = checkpoint.begin(root, state.step)
    sync()
    torch.save(checkpoint.rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_safetensors_model(unwrap(student), str(tmp / "student.safetensors"))
        if heads is not None:
            save_safetensors_model(heads, str(tmp / "heads.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "ema": ema.state_dict() if ema is not None else None,
                # the position counts global batches: their size makes it portable
                "loader": {**loader.state_dict(), "global_batch": loader.batch_size * loader.world_size},
                "loop": asdict(state),
                "num_processes": accelerator.num_processes,
            },
            tmp / "training_state.pt",
        )
    sync()
    if accelerator.is_main_process:
        keep = max(keep_last, 1)
        final = checkpoint.commit(root, tmp, state.step, keep, {"num_processes": accelerator.num_processes})
    sync()
    return final


def load_checkpoint(path, accelerator, student, heads, optimizer, scheduler, ema, loader, state) -> None:
    # A config changed under --force may no longer fit the checkpoint: the user's to fix, not a traceback.
    try:
        load_safetensors_model(unwrap(student), str(path / "student.safetensors"))
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(
            f"checkpoint '{path}' does not fit this student ({detail}): resume with the student it was trained "
            "with, or start a new run in another output_dir"
        ) from None
    if heads is not None:
        load_safetensors_model(heads, str(path / "heads.safetensors"))
    saved = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    try:
        loader.load_state_dict(saved["loader"])
    except ValueError as e:
        raise UserError(
            f"cannot resume from '{path}': {e}: restore them, or start a new run in another output_dir"
        ) from None
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if accelerator.scaler is not None and saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    if ema is not None and saved["ema"] is not None:
        ema.load_state_dict(saved["ema"])
    for k, v in saved["loop"].items():
        setattr(state, k, v)
    rng = path / f"rng-rank{accelerator.process_index}.pt"
    if not rng.exists():  # saved by fewer processes: set_seed gave every process rank 0's generators
        rng = path / "rng-rank0.pt"
    if rng.exists():
        checkpoint.set_rng_state(torch.load(rng, weights_only=False))


def export_final(out: Path, student, ema, tokenizer, final_eval, accelerator) -> dict[str, Any]:
    """`final/`: the student as a Hugging Face folder, with the better of raw and EMA weights on held-out bits
    per byte (raw when there is no held-out data), and `sakd.json` saying which."""
    choice = final_eval["best"] if final_eval else "raw"
    info = {"weights": choice, "bits_per_byte": final_eval["best_bits_per_byte"] if final_eval else None}
    if accelerator.is_main_process:
        model = unwrap(student)
        final = out / "final"
        context = ema.applied(model) if choice == "ema" and ema is not None else nullcontext()
        with context:
            model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        (final / "sakd.json").write_text(json.dumps(info, indent=1))
    accelerator.wait_for_everyone()
    return info
