"""Checkpoint folders: manifest with sizes and checksums, keep-last-N, damaged folders detected and skipped,
never a copy of the teacher, and never a file whose loading could run code."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import metrics_records, write_yaml
from run_helpers import assert_tensors_equal, checkpoint_dir, student_weights, training_state
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sakd.cli import main
from sakd.config import validate
from sakd.errors import UserError
from sakd.train import checkpoint
from sakd.train.loop import train

FILES = {"manifest.json", "rng-rank0.pt", "student.safetensors", "training_state.pt"}


@pytest.fixture
def three_checkpoints(make_raw, reference_run) -> tuple[dict, Path]:
    """A copy of a finished 3-step run with a checkpoint at every step, and its config."""
    raw = make_raw(max_steps=3, save_every=1, keep_last=5)
    shutil.copytree(reference_run(raw), raw["output_dir"])
    return raw, Path(raw["output_dir"])


def test_keep_last_prunes_older_checkpoints(make_raw):
    raw = make_raw(max_steps=5, save_every=1, keep_last=2)
    train(validate(raw))
    root = Path(raw["output_dir"]) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000005"]


def test_manifest_lists_every_file_with_size_and_sha256(three_checkpoints):
    _, run = three_checkpoints
    for ckpt in checkpoint.list_checkpoints(run / "checkpoints"):
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert manifest["step"] == int(ckpt.name.split("-")[1])
        assert set(manifest["files"]) == FILES - {"manifest.json"}
        for name, meta in manifest["files"].items():
            data = (ckpt / name).read_bytes()
            assert meta == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert checkpoint.verify(ckpt) is None


def _count_floats(obj) -> int:
    """Elements of the tensors in a nested structure, 0-d ones (AdamW's step counters) aside."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() if obj.dim() > 0 else 0
    if isinstance(obj, dict):
        return sum(_count_floats(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_floats(v) for v in obj)
    return 0


def _shapes(obj) -> list[tuple[int, ...]]:
    if isinstance(obj, torch.Tensor):
        return [tuple(obj.shape)]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _shapes(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _shapes(v)]
    return []


def test_checkpoints_never_hold_the_teacher(make_raw, reference_run, dropout_student, assets):
    """With every loss on (router and projection heads saved too): the student's tensor names, the heads',
    exactly two AdamW moments per trainable parameter and one EMA copy per student storage; no teacher
    tensor name and no tensor with the teacher's vocabulary dimension (its embedding or LM head)."""
    raw = make_raw(losses="all", max_steps=3)  # the run test_resume.py resumes, from the session's cache
    ckpt = checkpoint_dir(reference_run(raw), 3)
    assert {p.name for p in ckpt.iterdir()} == FILES | {"heads.safetensors"}
    student = AutoModelForCausalLM.from_pretrained(dropout_student)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    teacher_only = set(teacher.state_dict()) - set(student.state_dict())
    with safe_open(str(ckpt / "student.safetensors"), "pt") as f:
        student_names = set(f.keys())
    heads = load_file(str(ckpt / "heads.safetensors"))
    assert student_names <= set(student.state_dict())
    assert not (student_names | set(heads)) & teacher_only

    state = training_state(ckpt)
    n_params = sum(p.numel() for p in student.parameters())
    n_heads = sum(v.numel() for v in heads.values())
    # One EMA copy per storage: the tied embedding / LM head is averaged once.
    storages = {v.data_ptr(): v.numel() for v in student.state_dict().values() if v.is_floating_point()}
    n_state = sum(storages.values())
    assert _count_floats(state) == 2 * (n_params + n_heads) + n_state

    teacher_vocab = teacher.config.vocab_size
    assert teacher_vocab != student.config.vocab_size
    with safe_open(str(ckpt / "student.safetensors"), "pt") as f:
        saved = [tuple(f.get_slice(k).get_shape()) for k in f.keys()]
    saved += _shapes(heads) + _shapes(state)
    assert not [s for s in saved if teacher_vocab in s]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))


def test_auto_resume_skips_a_truncated_checkpoint(three_checkpoints, caplog):
    """The newest checkpoint's weights file is cut short (a crash during a copy, a full disk): --resume auto
    warns, resumes from the previous one, and redoing the step gives the same weights as before."""
    raw, run = three_checkpoints
    newest = checkpoint_dir(run, 3)
    intact = student_weights(newest)
    _truncate(newest / "student.safetensors")
    assert "student.safetensors has" in checkpoint.verify(newest)

    with caplog.at_level(logging.WARNING):
        train(validate(raw), resume="auto")
    assert any(
        "skipping damaged checkpoint" in r.getMessage() and "step-000003" in r.getMessage()
        for r in caplog.records
    )
    assert metrics_records(run, "resume")[-1]["from"] == str(checkpoint_dir(run, 2))
    assert checkpoint.verify(newest) is None
    assert_tensors_equal(student_weights(newest), intact, "redone step 3")


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [(_truncate, "student.safetensors", "bytes"), (_flip_a_byte, "training_state.pt", "checksum")],
    ids=["truncated-weights", "flipped-byte"],
)
def test_resume_from_a_damaged_checkpoint_path_is_refused(three_checkpoints, capsys, damage, file, problem):
    raw, run = three_checkpoints
    newest = checkpoint_dir(run, 3)
    damage(newest / file)
    config = write_yaml(raw, run.parent / "config.yaml")
    before = (run / "metrics.jsonl").read_text()

    code = main(["train", str(config), "--resume", str(newest)])

    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "damaged" in line and file in line and problem in line
    assert "--resume auto" in line
    assert (run / "metrics.jsonl").read_text() == before


def test_a_folder_without_manifest_is_skipped(three_checkpoints, caplog):
    """A crash between writing the files and the manifest leaves a folder that must not be used."""
    raw, run = three_checkpoints
    partial = checkpoint_dir(run, 4)
    shutil.copytree(checkpoint_dir(run, 3), partial)
    (partial / "manifest.json").unlink()
    leftover = run / "checkpoints" / ".tmp-step-000005"
    shutil.copytree(checkpoint_dir(run, 3), leftover)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve_resume(run / "checkpoints", "auto") == checkpoint_dir(run, 3)
    assert any("no manifest" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="damaged"):
        checkpoint.resolve_resume(run / "checkpoints", str(partial))


def test_resume_auto_without_any_complete_checkpoint_starts_fresh(tmp_path):
    assert checkpoint.resolve_resume(tmp_path / "checkpoints", "auto") is None
    (tmp_path / "checkpoints" / "step-000001").mkdir(parents=True)
    assert checkpoint.resolve_resume(tmp_path / "checkpoints", "auto") is None


def test_commit_replaces_a_checkpoint_of_the_same_step_atomically(tmp_path):
    root = tmp_path / "checkpoints"
    for content in (b"first", b"second"):
        tmp = checkpoint.begin(root, 7)
        (tmp / "student.safetensors").write_bytes(content)
        final = checkpoint.commit(root, tmp, 7, keep_last=2)
    assert (final / "student.safetensors").read_bytes() == b"second"
    assert [p.name for p in root.iterdir()] == ["step-000007"]
    assert checkpoint.verify(final) is None


def test_rng_state_round_trips(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


class _RunsCodeWhenUnpickled:
    """Unpickling this calls exec, which here writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _rewrite_manifest(ckpt: Path) -> None:
    """The manifest made to match the files again, as a checkpoint written elsewhere would be."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (ckpt / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("file", ["training_state.pt", "rng-rank0.pt"])
def test_a_checkpoint_that_would_run_code_when_loaded_is_refused(three_checkpoints, capsys, tmp_path, file):
    """Checkpoint state is unpickled with weights_only=True: an object whose unpickling runs code is refused
    with one error line, and the code never runs."""
    raw, run = three_checkpoints
    newest = checkpoint_dir(run, 3)
    marker = tmp_path / "code-ran"
    state = torch.load(newest / file, weights_only=True)
    state["payload"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, newest / file)
    _rewrite_manifest(newest)
    assert checkpoint.verify(newest) is None
    config = write_yaml(raw, run.parent / "config.yaml")

    code = main(["train", str(config), "--resume", str(newest)])

    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "not loadable safely" in line and file in line
    assert not marker.exists()
