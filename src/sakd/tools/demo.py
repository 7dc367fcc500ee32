"""`sakd demo`: the whole pipeline offline, on the Python standard library's own source files.

A Qwen3-MoE-style teacher with one byte-level BPE tokenizer is pretrained on the corpus (cached), then
distilled into a small Llama-style student with a different tokenizer; the same student trained on the LM
loss alone, with the same steps and data, is the baseline. All three are scored on held-out files in bits
per byte, the measure that compares models across tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sakd.config import validate
from sakd.eval.run import EvalData, evaluate_model
from sakd.models.tiny import dense_student_config, moe_teacher_config, train_tokenizer
from sakd.train.loop import train


@dataclass(frozen=True)
class DemoSize:
    train_mb: float
    eval_mb: float
    max_length: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    teacher_hidden: int
    teacher_layers: int
    student_hidden: int
    student_layers: int
    eval_windows: int


FULL = DemoSize(6.0, 0.5, 128, 600, 600, 16, 192, 4, 128, 4, 200)
QUICK = DemoSize(1.5, 0.25, 128, 200, 200, 8, 128, 2, 64, 2, 64)


def stdlib_files() -> list[Path]:
    """The running interpreter's own standard library sources (installed packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )


def is_eval_file(path: Path) -> bool:
    """A deterministic split by file: about one file in ten is held out."""
    return hashlib.sha256(path.as_posix().encode()).digest()[0] < 26


def write_corpus(out: Path, size: DemoSize) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    if train_path.exists() and eval_path.exists():
        return train_path, eval_path
    budgets = {train_path: size.train_mb * 1e6, eval_path: size.eval_mb * 1e6}
    used = dict.fromkeys(budgets, 0)
    handles = {p: p.with_suffix(".tmp").open("w") for p in budgets}
    for f in stdlib_files():
        target = eval_path if is_eval_file(f) else train_path
        if used[target] >= budgets[target]:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            handles[target].write(json.dumps({"text": text, "path": f.name}) + "\n")
            used[target] += len(text)
    for p, h in handles.items():
        h.close()
        p.with_suffix(".tmp").rename(p)
    return train_path, eval_path


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def prepare_models(work: Path, train_path: Path, size: DemoSize) -> tuple[Path, Path]:
    """Tokenizers and untrained model folders (config + tokenizer) for the teacher and the student."""
    teacher_init, student_init = work / "teacher-init", work / "student-init"
    if not (teacher_init / "config.json").exists() or not (student_init / "config.json").exists():
        texts = _texts(train_path)
        # Both byte-level BPE (as Qwen's and SmolLM's are), of different sizes and trained on different halves
        # of the corpus, so the vocabularies and the token boundaries differ.
        teacher_tok = train_tokenizer(texts[0::2], 4096, split="gpt2")
        student_tok = train_tokenizer(texts[1::2], 2048, split="gpt2")
        t_cfg = moe_teacher_config(
            len(teacher_tok), size.teacher_hidden, size.teacher_layers, max_length=4 * size.max_length
        )
        s_cfg = dense_student_config(
            len(student_tok), size.student_hidden, size.student_layers, max_length=4 * size.max_length
        )
        for folder, cfg, tok in ((teacher_init, t_cfg, teacher_tok), (student_init, s_cfg, student_tok)):
            folder.mkdir(parents=True, exist_ok=True)
            cfg.save_pretrained(folder)
            tok.save_pretrained(folder)
    return teacher_init, student_init


def _run(name: str, work: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Train one model; a finished run is reused, an interrupted one resumed."""
    out = work / name
    summary = out / "summary.json"
    if summary.exists():
        print(f"[{name}] reusing {out}")
        return json.loads(summary.read_text())
    cfg = validate({**raw, "output_dir": str(out)})
    return train(cfg, resume="auto" if (out / "config.yaml").exists() else None)


@dataclass(frozen=True)
class DemoSetup:
    """Everything a student run of the demo needs: corpus, a pretrained teacher, the untrained student."""

    work: Path
    size: DemoSize
    eval_path: Path
    teacher: Path
    student_init: Path
    data: dict[str, Any]

    def student_config(self, teacher: bool = True, seed: int = 0, **sections: Any) -> dict[str, Any]:
        """The raw config of a student run (without output_dir): random init, the demo's data and steps;
        `seed` sets the student's initialisation and data order."""
        train_section = {**_common_train(self.size), "max_steps": self.size.student_steps, "lr": 3e-3}
        raw = {
            "student": {"model": str(self.student_init), "init": "random"},
            "data": self.data,
            "train": {**train_section, "seed": seed},
            **sections,
        }
        if teacher:
            raw["teacher"] = {"model": str(self.teacher)}
        return raw

    def student_run(self, name: str, teacher: bool = True, seed: int = 0, **sections: Any) -> dict[str, Any]:
        return _run(name, self.work, self.student_config(teacher, seed, **sections))

    def score(self, model: Path, role: str) -> dict[str, Any]:
        data = EvalData([str(self.eval_path)], self.size.max_length, 16, self.size.eval_windows)
        return evaluate_model(str(model), role, data)


def _common_train(size: DemoSize) -> dict[str, Any]:
    return {"batch_size": size.batch_size, "seed": 0, "log_every": 25, "warmup_steps": 20}


def prepare(workdir: str | Path, quick: bool) -> DemoSetup:
    """Corpus, tokenizers and model configs, and the pretrained MoE teacher (all cached in `workdir`)."""
    size = QUICK if quick else FULL
    work = Path(workdir) / ("quick" if quick else "full")
    train_path, eval_path = write_corpus(work / "corpus", size)
    teacher_init, student_init = prepare_models(work, train_path, size)
    data = {
        "train": [str(train_path)],
        "eval": [str(eval_path)],
        "max_length": size.max_length,
        "eval_max_windows": size.eval_windows,
    }
    print("pretraining the MoE teacher (cached after the first run)")
    _run(
        "teacher",
        work,
        {
            "student": {"model": str(teacher_init), "init": "random"},
            "data": data,
            "train": {**_common_train(size), "max_steps": size.teacher_steps, "lr": 3e-3, "ema_decay": None},
        },
    )
    return DemoSetup(work, size, eval_path, work / "teacher" / "final", student_init, data)


def run_demo(workdir: str | Path, quick: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    print(f"sakd demo ({'quick' if quick else 'full'}) in {Path(workdir)}")
    setup = prepare(workdir, quick)
    print("distilling the teacher into the student (another tokenizer)")
    setup.student_run("distilled")
    print("training the same student on the LM loss alone (baseline)")
    setup.student_run("baseline", teacher=False)
    work = setup.work
    scored = {
        "teacher": setup.score(setup.teacher, "teacher"),
        "student": setup.score(work / "distilled" / "final", "student"),
        "baseline": setup.score(work / "baseline" / "final", "baseline"),
    }
    report = {
        "teacher_bpb": scored["teacher"]["bits_per_byte"],
        "student_bpb": scored["student"]["bits_per_byte"],
        "baseline_bpb": scored["baseline"]["bits_per_byte"],
        "distillation_gain_bpb": scored["baseline"]["bits_per_byte"] - scored["student"]["bits_per_byte"],
        "teacher_parameters": scored["teacher"]["parameters"],
        "student_parameters": scored["student"]["parameters"],
        "student_steps": setup.size.student_steps,
        "eval_bytes": scored["student"]["bytes"],
        "models": scored,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    (Path(workdir) / "report.json").write_text(json.dumps(report, indent=1))
    (work / "report.json").write_text(json.dumps(report, indent=1))
    verdict = "beats" if report["distillation_gain_bpb"] > 0 else "does NOT beat"
    print(
        f"\nheld-out bits per byte: teacher {report['teacher_bpb']:.4f} | distilled student "
        f"{report['student_bpb']:.4f} | baseline student {report['baseline_bpb']:.4f}\n"
        f"the distilled student {verdict} the baseline by {report['distillation_gain_bpb']:+.4f} bits per byte "
        f"({report['elapsed_s']:.0f} s); report: {Path(workdir) / 'report.json'}"
    )
    return report
