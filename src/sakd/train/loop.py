"""The training loop: distil a frozen teacher into a student on HF Accelerate.

One optimizer step = `grad_accum` micro-batches per process. Loss sums are divided by the token counts of the
whole step over all processes, so batch 4 x accumulation 1 equals batch 2 x accumulation 2. A step whose loss
or gradient is not finite is skipped on every process and counted. The run can be killed at any point and
resumed from its newest complete checkpoint with the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from sakd.config import Config
from sakd.curriculum import CurriculumPoint, curriculum_at, training_progress
from sakd.data.tokenize import log_input_format
from sakd.models.load import load_tokenizer, resolve_precision, unwrap
from sakd.report import build_report
from sakd.report.trackers import MetricsWriter, open_trackers
from sakd.train import checkpoint, rundir
from sakd.train.collective import agree_max, global_losses, release_host_groups
from sakd.train.evaluate import eval_batches as make_eval_batches
from sakd.train.evaluate import evaluate_student, measure_before_training
from sakd.train.inputs import training_inputs
from sakd.train.persist import export_final, load_checkpoint, save_checkpoint
from sakd.train.sharding import is_sharded
from sakd.train.skips import SkipVerdicts
from sakd.train.step import build_training, check_heads, step_batches, train_step
from sakd.train.tracking import LogInterval, LoopState, early_stop_due

log = logging.getLogger("sakd")


class TrainingStopped(Exception):
    """Training ended before max_steps for a reason the user must see (exit status `code`)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


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
    evaluation, so that evaluation weighs the losses as training does at that step."""
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
    if main:
        log_input_format(student_tok, "student")
        if teacher_tok is not None:
            log_input_format(teacher_tok, "teacher")
    inputs = training_inputs(cfg, student_tok, teacher_tok, accelerator.num_processes, main and tc.progress)
    cached = inputs.cached
    t = build_training(cfg, accelerator, precision, student_tok, teacher_tok, cached)
    loader = inputs.loader(cfg, accelerator, student_tok, teacher_tok)
    state = LoopState()
    ckpt_root = out / "checkpoints"

    def save(tag: str = "", collective: bool = True) -> Path:
        path = save_checkpoint(
            ckpt_root,
            accelerator,
            t.student,
            t.heads,
            t.optimizer,
            t.scheduler,
            t.ema,
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
        load_checkpoint(
            start_path, accelerator, t.student, t.heads, t.optimizer, t.scheduler, t.ema, loader, state
        )
    writer: MetricsWriter | _NoWriter = _NoWriter()
    if main:
        environment = rundir.environment_snapshot(
            str(accelerator.device), precision, accelerator.num_processes
        )
        # trackers first: one that cannot start must not leave a folder that looks like a run
        writer = open_trackers(out, tc.trackers, tc.wandb_project, cfg.model_dump(mode="json"))
        rundir.write_run_files(out, cfg, environment)
        if start_path is not None:
            writer.log({"event": "resume", "step": state.step, "from": str(start_path)})
    eval_batches = make_eval_batches(inputs.eval_windows, tc.batch_size, student_tok, teacher_tok)
    if start_path is None:  # a resumed run measured its models when it started
        measure_before_training(t, inputs.eval_windows, tc.batch_size, student_tok, teacher_tok, writer)

    def evaluate() -> dict[str, Any]:
        point = curriculum_point(cfg, state.step)
        result = evaluate_student(
            t.student, t.teacher, t.objective, eval_batches, point, accelerator, t.ema, main and tc.progress
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

    verdicts = SkipVerdicts()

    def settle() -> None:
        """Read the pending skip verdicts (one wait for the device); stop when too many steps were skipped."""
        verdicts.settle(state, writer, accelerator, tc.nonfinite_window)
        if state.skipped_steps and sum(state.recent_skips) > tc.nonfinite_max_rate * tc.nonfinite_window:
            save(" (non-finite stop)")
            release_host_groups()  # every process stops here together
            raise TrainingStopped(
                f"{sum(state.recent_skips)} of the last {len(state.recent_skips)} steps had a non-finite "
                "loss or gradient (skipped windows are listed in metrics.jsonl); likely causes: a learning "
                "rate too high, fp16 overflow (use bf16 or fp32), a teacher that outputs NaN/inf, or bad "
                f"data. The newest checkpoint is in {ckpt_root}"
            )

    desc = "distilling" if cfg.teacher is not None else "training (LM only)"
    bar = tqdm(total=tc.max_steps, initial=state.step, desc=desc, disable=not (main and tc.progress))
    show_phase = _phases_differ(cfg)
    last_eval: dict[str, Any] | None = None
    interval = LogInterval()
    t_segment = time.perf_counter()
    elapsed_at_start = state.elapsed_s
    stop_reason = None
    heads_checked = False
    boundary = (loader.state_dict(), checkpoint.rng_state())
    with StopFlag() as stop:
        try:
            while state.step < tc.max_steps:
                boundary = (loader.state_dict(), checkpoint.rng_state())
                host_batches = [loader.next_batch() for _ in range(tc.grad_accum)]
                batches = step_batches(host_batches, accelerator)
                if not heads_checked:
                    check_heads(t, batches.batches[0])
                    heads_checked = True
                point = curriculum_point(cfg, state.step)
                result = train_step(t, batches, point)
                state.step += 1
                boundary = (loader.state_dict(), checkpoint.rng_state())
                state.tokens_seen += batches.tokens
                state.elapsed_s = elapsed_at_start + time.perf_counter() - t_segment
                loss_sum, parts_sum = global_losses(result.loss, result.parts, accelerator)
                verdicts.add(state.step, result, loss_sum, batches.windows)
                interval.add(loss_sum, parts_sum, batches.tokens, result.grad_norm, result.stepped)
                bar.update()
                log_due = state.step % tc.log_every == 0 or state.step == tc.max_steps
                eval_due = bool(eval_batches and tc.eval_every and state.step % tc.eval_every == 0)
                save_due = bool(tc.save_every and state.step % tc.save_every == 0)
                if log_due or eval_due or save_due:
                    settle()
                if log_due:
                    record = interval.flush(state, t.scheduler.get_last_lr()[0], point)
                    writer.log(record)
                    postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}"}
                    if show_phase:
                        postfix["phase"] = point.phase
                    bar.set_postfix(**postfix, tok_s=f"{record['tokens_per_s']:.0f}")
                if eval_due and state.step < tc.max_steps:
                    last_eval = evaluate()
                    if agree_max(int(early_stop_due(state, last_eval, tc)), accelerator):
                        stop_reason = "early stop"
                if save_due and state.step < tc.max_steps:
                    save()
                signum = agree_max(stop.signum, accelerator)
                if signum:
                    settle()
                    save(" (emergency)")
                    release_host_groups()  # every process stops here together
                    name = signal.Signals(signum).name
                    raise TrainingStopped(
                        f"stopped by {name} at step {state.step}; a checkpoint is in {ckpt_root}: resume with "
                        "`sakd train CONFIG --resume auto`",
                        code=128 + signum,
                    )
                if tc.max_minutes and agree_max(int(state.elapsed_s > 60 * tc.max_minutes), accelerator):
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
                    if accelerator.num_processes == 1:  # (with others, recording a skip is collective)
                        verdicts.settle(state, writer, accelerator, tc.nonfinite_window)
                    save(" (emergency)", collective=False)
                except Exception:  # the original failure matters more than a failed emergency save
                    log.exception("emergency checkpoint failed")
            raise
        finally:
            bar.close()
            writer.flush()

    settle()
    final_eval = evaluate() if eval_batches else None
    save()
    export = export_final(out, t.student, t.ema, student_tok, final_eval, accelerator)
    summary = {
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "tokens_seen": state.tokens_seen,
        "elapsed_s": round(state.elapsed_s, 2),
        "stop_reason": stop_reason or "max_steps",
        "objective": t.objective.kind,
        "sharded": {
            "student": is_sharded(unwrap(t.student)),
            "teacher": t.teacher is not None and is_sharded(t.teacher),
        },
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
    release_host_groups()
    return summary


def _phases_differ(cfg: Config) -> bool:
    """Whether the curriculum's phases train differently (the progress bar shows the phase only then); the
    router's top-k and temperature matter only when the router is used."""

    def key(point: CurriculumPoint) -> tuple:
        w = cfg.curriculum.weights
        uses_router = w.router > 0 or w.balance > 0 or w.token_weighting > 0
        router = (point.top_k, point.router_temperature) if uses_router else ()
        return (tuple(sorted(point.weights.items())), point.temperature, *router)

    keys = {key(curriculum_at(i / 20, cfg.curriculum)) for i in range(21)}
    return len(keys) > 1
