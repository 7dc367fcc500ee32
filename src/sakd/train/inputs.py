"""What a run reads: the training and held-out windows, the teacher cache joined to them, the batch loader."""

from __future__ import annotations

from dataclasses import dataclass

from accelerate import Accelerator
from tqdm.auto import tqdm

from sakd.cache.keys import keyed_windows
from sakd.cache.training import CachedBatches, CachedTeacher, open_training_cache
from sakd.config import Config
from sakd.data.chat import use_chat_templates
from sakd.data.corpus import build_windows
from sakd.data.loader import Shard, WindowLoader
from sakd.data.packing import Window
from sakd.data.tokenize import input_format
from sakd.errors import UserError


@dataclass
class TrainingInputs:
    windows: list[Window]
    eval_windows: list[Window]
    cached: CachedTeacher | None  # the teacher cache, when it replaces the teacher

    def loader(
        self, cfg: Config, accelerator: Accelerator, student_tok, teacher_tok
    ) -> WindowLoader | CachedBatches:
        """This process's shard of the shuffled training batches (with their cached teacher rows)."""
        loader = WindowLoader(
            self.windows,
            cfg.train.batch_size,
            cfg.train.seed,
            shard=Shard(accelerator.process_index, accelerator.num_processes),
            student=input_format(student_tok),
            teacher=input_format(teacher_tok),
        )
        return loader if self.cached is None else self.cached.batches(loader)


def training_inputs(cfg: Config, student_tok, teacher_tok, processes: int, progress: bool) -> TrainingInputs:
    """Tokenize and pack the training (and held-out) data, and open the teacher cache if the config names one:
    a UserError when the data gives less than one batch over `processes`, or the cache does not fit."""
    use_chat_templates(student_tok, teacher_tok, cfg)  # templates from files, where the config names them
    bar = tqdm(total=2 if cfg.data.eval else 1, desc="tokenizing", disable=not progress)
    keyed = None
    if cfg.teacher and cfg.teacher.cache:  # the cache's keys come with the windows: one tokenization
        keyed = keyed_windows(cfg.data.train, student_tok, teacher_tok, cfg.data.max_length)
        windows = keyed.windows
    else:
        windows = build_windows(cfg.data.train, student_tok, teacher_tok, cfg.data.max_length)
    bar.update()
    eval_windows = []
    if cfg.data.eval:
        eval_windows = build_windows(
            cfg.data.eval, student_tok, teacher_tok, cfg.data.max_length, cfg.data.eval_max_windows
        )
        bar.update()
    bar.close()
    per_step = cfg.train.batch_size * processes
    if len(windows) < per_step:
        raise UserError(
            f"the training data gives {len(windows)} windows of {cfg.data.max_length} tokens, fewer than one "
            f"batch ({per_step}): add data or lower train.batch_size / data.max_length"
        )
    cached = None
    if keyed is not None:  # the cache replaces the teacher, which is not loaded
        cached = open_training_cache(
            cfg.teacher.cache,
            windows,
            cfg.data.train,
            cfg.data.max_length,
            cfg.teacher.model,
            student_tok,
            teacher_tok,
            keyed,
        )
    return TrainingInputs(windows, eval_windows, cached)
