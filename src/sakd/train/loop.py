"""The training loop: distil a frozen teacher into a student on HF Accelerate.

One optimizer step = `grad_accum` micro-batches per process. Loss sums are divided by the token counts of the
whole step over all processes, so batch 4 x accumulation 1 equals batch 2 x accumulation 2. A step whose loss
or gradient is not finite is skipped on every process and counted. The run can be killed at any point and
resumed from its newest complete checkpoint with the same result as an uninterrupted run.

`train` runs the phases over one `Run`: `setup` (tokenizers, data, models), `resume` (from a checkpoint),
`open_tracking` (run files, metrics, the before-training measurement), `fit` (the steps, each followed by its
`boundary`: log, evaluate, save, stop) and `finish` (final evaluation, checkpoint, export, summary, report).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from sakd.config import Config
from sakd.curriculum import CurriculumPoint, curriculum_at, training_progress
from sakd.data.tokenize import log_input_format
from sakd.models.load import load_tokenizer, resolve_precision, unwrap
from sakd.report import build_report
from sakd.report.trackers import open_trackers
from sakd.train import checkpoint, rundir
from sakd.train.checkpoint import load_checkpoint, save_checkpoint
from sakd.train.collective import agree_max, global_losses, release_host_groups
from sakd.train.evaluate import eval_batches as make_eval_batches
from sakd.train.evaluate import evaluate_student, measure_before_training
from sakd.train.export import export_final
from sakd.train.inputs import training_inputs
from sakd.train.on_policy import OnPolicy
from sakd.train.run import Run, TrainingStopped, make_accelerator
from sakd.train.sharding import is_sharded
from sakd.train.step import build_training, check_heads, step_batches, train_step
from sakd.train.tracking import LogInterval, early_stop_due, peak_memory

log = logging.getLogger("sakd")

__all__ = ["Run", "TrainingStopped", "curriculum_point", "train"]


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
    run = setup(cfg, resume, force)
    if resume:
        resume_run(run, resume)
    open_tracking(run)
    stop_reason, last_eval = fit(run)
    return finish(run, stop_reason, last_eval)


def setup(cfg: Config, resume: str | None, force: bool) -> Run:
    """The run folder, tokenizers, data, models, objective and optimizer; nothing is logged yet."""
    # The first PartialState decides the backend: without ACCELERATE_USE_CPU, torchrun's CPU workers
    # would each train alone.
    distributed = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    out = rundir.prepare(cfg, resume, force, distributed.num_processes)
    tc = cfg.train
    precision = resolve_precision(tc.precision, distributed.device)
    accelerator = make_accelerator(precision)
    main = accelerator.is_main_process
    set_seed(tc.seed)

    student_tok = load_tokenizer(cfg.student.tokenizer_path, "student")
    teacher_tok = load_tokenizer(cfg.teacher.tokenizer_path, "teacher") if cfg.teacher else None
    if main:
        log_input_format(student_tok, "student")
        if teacher_tok is not None:
            log_input_format(teacher_tok, "teacher")
    inputs = training_inputs(cfg, student_tok, teacher_tok, accelerator.num_processes, main and tc.progress)
    training = build_training(cfg, accelerator, precision, student_tok, teacher_tok, inputs.cached)
    loader = inputs.loader(cfg, accelerator, student_tok, teacher_tok)
    run = Run(cfg, out, training, inputs, loader, (student_tok, teacher_tok))
    run.on_policy = OnPolicy.of(cfg, inputs.windows, (student_tok, teacher_tok), accelerator.process_index)
    run.eval_batches = make_eval_batches(inputs.eval_windows, tc.batch_size, student_tok, teacher_tok)
    return run


def resume_run(run: Run, resume: str) -> None:
    """Restore the run from the checkpoint `resume` names (`auto`: the newest complete one), if any."""
    run.resumed_from = checkpoint.resolve_resume(run.checkpoints, resume)
    if run.resumed_from is not None:
        load_checkpoint(run, run.resumed_from)


def open_tracking(run: Run) -> None:
    """The run files and the metrics writer (main process), and, for a new run, the models measured on
    held-out data before any step."""
    cfg, tc = run.cfg, run.cfg.train
    if run.main:
        accelerator = run.accelerator
        precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
        environment = rundir.environment_snapshot(
            str(accelerator.device), precision, accelerator.num_processes
        )
        # trackers first: one that cannot start must not leave a folder that looks like a run
        run.writer = open_trackers(run.out, tc.trackers, tc.wandb_project, cfg.model_dump(mode="json"))
        rundir.write_run_files(run.out, cfg, environment)
        if run.resumed_from is not None:
            run.writer.log({"event": "resume", "step": run.state.step, "from": str(run.resumed_from)})
    if run.resumed_from is None:  # a resumed run measured its models when it started
        student_tok, teacher_tok = run.tokenizers
        windows = run.inputs.eval_windows
        measure_before_training(run.training, windows, tc.batch_size, student_tok, teacher_tok, run.writer)


def save(run: Run, tag: str = "", collective: bool = True) -> Path:
    path = save_checkpoint(run, collective)
    if run.main:
        log.info("checkpoint%s saved: %s", tag, path)
    return path


def evaluate(run: Run) -> dict[str, Any]:
    """Held-out metrics at the current step, logged and written to the metrics. The distillation loss is
    weighed as the step just trained was, not as the next one will be: at the end of training the next
    point is progress 1, where a KD weight that fades to 0 would leave nothing of KD to measure."""
    t, state = run.training, run.state
    point = curriculum_point(run.cfg, max(state.step - 1, 0))
    progress = run.main and run.cfg.train.progress
    result = evaluate_student(
        t.student, t.teacher, t.objective, run.eval_batches, point, run.accelerator, t.ema, progress
    )
    result["step"] = state.step
    run.writer.log({"event": "eval", **result})
    if run.main:
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


def settle(run: Run) -> None:
    """Read the pending skip verdicts (one wait for the device); stop when too many steps were skipped."""
    tc = run.cfg.train
    run.guard.settle(run.state, run.writer, run.accelerator, tc.nonfinite_window)
    if run.guard.too_many(run.state, tc):
        save(run, " (non-finite stop)")
        release_host_groups()  # every process stops here together
        raise TrainingStopped(run.guard.stop_message(run.state, run.checkpoints))


@dataclass
class Progress:
    """What the loop tracks between steps but never saves: the bar, the log interval, timing, the last
    evaluation and the step boundary an emergency checkpoint goes back to."""

    bar: Any
    show_phase: bool
    interval: LogInterval = field(default_factory=LogInterval)
    started: float = field(default_factory=time.perf_counter)
    elapsed_at_start: float = 0.0
    last_eval: dict[str, Any] | None = None
    stop_reason: str | None = None
    boundary: tuple[Any, Any] | None = None
    point: CurriculumPoint | None = None  # of the step just taken
    heads_checked: bool = False


def fit(run: Run) -> tuple[str | None, dict[str, Any] | None]:
    """The optimizer steps up to `max_steps` (or an early stop, a time budget, a signal). Returns (the reason
    training stopped early or None, the last periodic evaluation)."""
    cfg, tc, state = run.cfg, run.cfg.train, run.state
    desc = "distilling" if cfg.teacher is not None else "training (LM only)"
    bar = tqdm(total=tc.max_steps, initial=state.step, desc=desc, disable=not (run.main and tc.progress))
    progress = Progress(bar, _phases_differ(cfg), elapsed_at_start=state.elapsed_s)
    progress.boundary = (run.loader.state_dict(), checkpoint.rng_state())
    with StopFlag() as stop:
        try:
            while state.step < tc.max_steps:
                step(run, progress)
                boundary(run, progress, stop)
                if progress.stop_reason:
                    break
        except (Exception, KeyboardInterrupt) as exc:
            if not isinstance(exc, TrainingStopped):
                emergency_save(run, progress)
            raise
        finally:
            bar.close()
            run.writer.flush()
    return progress.stop_reason, progress.last_eval


def step(run: Run, progress: Progress) -> None:
    """One optimizer step; its verdict and losses are kept on the device until the next boundary reads them."""
    t, state, accelerator = run.training, run.state, run.accelerator
    progress.boundary = (run.loader.state_dict(), checkpoint.rng_state())
    host_batches = [run.loader.next_batch() for _ in range(run.cfg.train.grad_accum)]
    point = curriculum_point(run.cfg, state.step)
    if run.on_policy is not None:
        host_batches, sampled = run.on_policy(t.student, host_batches, state.step, point, accelerator)
        progress.interval.sampled += sampled
    batches = step_batches(host_batches, accelerator)
    if not progress.heads_checked:
        check_heads(t, batches.batches[0])
        progress.heads_checked = True
    result = train_step(t, batches, point)
    state.step += 1
    progress.boundary = (run.loader.state_dict(), checkpoint.rng_state())
    state.tokens_seen += batches.tokens
    state.elapsed_s = progress.elapsed_at_start + time.perf_counter() - progress.started
    loss_sum, parts_sum = global_losses(result.loss, result.parts, accelerator)
    run.guard.add(state.step, result, loss_sum, batches.windows)
    progress.interval.add(loss_sum, parts_sum, batches.tokens, result.grad_norm, result.stepped)
    progress.point = point
    progress.bar.update()


def boundary(run: Run, progress: Progress, stop: StopFlag) -> None:
    """After a step: log, evaluate, save when due, and stop on a signal, an early stop or the time budget."""
    tc, state, accelerator = run.cfg.train, run.state, run.accelerator
    log_due = state.step % tc.log_every == 0 or state.step == tc.max_steps
    eval_due = bool(run.eval_batches and tc.eval_every and state.step % tc.eval_every == 0)
    save_due = bool(tc.save_every and state.step % tc.save_every == 0)
    if log_due or eval_due or save_due:
        settle(run)
    if log_due:
        record = progress.interval.flush(state, run.training.scheduler.get_last_lr()[0], progress.point)
        run.writer.log(record)
        postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}"}
        if progress.show_phase:
            postfix["phase"] = progress.point.phase
        progress.bar.set_postfix(**postfix, tok_s=f"{record['tokens_per_s']:.0f}")
    if eval_due and state.step < tc.max_steps:
        progress.last_eval = evaluate(run)
        if agree_max(int(early_stop_due(state, progress.last_eval, tc)), accelerator):
            progress.stop_reason = "early stop"
    if save_due and state.step < tc.max_steps:
        save(run)
    signum = agree_max(stop.signum, accelerator)
    if signum:
        settle(run)
        save(run, " (emergency)")
        release_host_groups()  # every process stops here together
        raise TrainingStopped(
            f"stopped by {signal.Signals(signum).name} at step {state.step}; a checkpoint is in "
            f"{run.checkpoints}: resume with `sakd train CONFIG --resume auto`",
            code=128 + signum,
        )
    if tc.max_minutes and agree_max(int(state.elapsed_s > 60 * tc.max_minutes), accelerator):
        progress.stop_reason = f"time budget of {tc.max_minutes} minutes spent"


def emergency_save(run: Run, progress: Progress) -> None:
    """After a failure: a checkpoint of the last finished step, unless nothing was trained yet."""
    if run.state.step == 0:
        return
    try:
        # Back to the last step boundary, so that the checkpoint matches the weights. The other processes may
        # be dead or stuck in a collective: the main process saves alone.
        run.loader.load_state_dict(progress.boundary[0])
        checkpoint.set_rng_state(progress.boundary[1])
        if run.accelerator.num_processes == 1:  # (with others, recording a skip is collective)
            run.guard.settle(run.state, run.writer, run.accelerator, run.cfg.train.nonfinite_window)
        save(run, " (emergency)", collective=False)
    except Exception:  # the original failure matters more than a failed emergency save
        log.exception("emergency checkpoint failed")


def finish(run: Run, stop_reason: str | None, last_eval: dict[str, Any] | None) -> dict[str, Any]:
    """The final evaluation, checkpoint and export; the summary (returned, and in summary.json) and report."""
    t, state, accelerator = run.training, run.state, run.accelerator
    settle(run)
    final_eval = evaluate(run) if run.eval_batches else None
    save(run)
    export = export_final(run.out, t.student, t.ema, run.tokenizers[0], final_eval, accelerator)
    cached = run.inputs.cached
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
        "peak_memory": peak_memory(accelerator.device),
        "final": export,
        "eval": final_eval,
        "last_periodic_eval": last_eval,
    }
    run.writer.log({"event": "end", **summary})
    run.writer.close()
    if run.main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
        try:
            build_report(run.out)
        except Exception:  # a failed report must not fail a finished run
            log.warning("the run report could not be built", exc_info=True)
    accelerator.wait_for_everyone()
    release_host_groups()
    return summary


def _phases_differ(cfg: Config) -> bool:
    """Whether the curriculum's phases train differently (the progress bar shows the phase only then): which
    losses have ramped in, not KD's fade, which goes on across phases; the router's top-k and temperature
    matter only when the router is used."""
    w = cfg.curriculum.weights

    def key(point: CurriculumPoint) -> tuple:
        uses_router = w.router > 0 or w.balance > 0 or w.token_weighting > 0
        router = (point.top_k, point.router_temperature) if uses_router else ()
        ramped = tuple(sorted((name, f) for name, f in point.fraction.items() if getattr(w, name) > 0))
        return (ramped, point.temperature, *router)

    keys = {key(curriculum_at(i / 20, cfg.curriculum)) for i in range(21)}
    return len(keys) > 1
