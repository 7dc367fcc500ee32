"""A user's mistake gives one `error:` line naming the problem and the fix, exit status 2, no traceback, and
nothing written (STYLE habit 6)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_yaml
from transformers import ByT5Tokenizer, LlamaConfig

from sakd.cli import main


@pytest.fixture
def raw(base_config) -> dict:
    cfg = copy.deepcopy(base_config)
    cfg["data"].update(eval=[], max_length=32)
    cfg["train"].update(max_steps=1, batch_size=1, warmup_steps=0)
    return cfg


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _fails(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_missing_model_path(raw, tmp_path, capsys):
    raw["student"]["model"] = str(tmp_path / "no-such-student")
    _fails(
        capsys,
        ["train", str(write_yaml(raw, tmp_path / "c.yaml"))],
        "student.model",
        "does not exist",
        "fix the paths",
    )
    assert not Path(raw["output_dir"]).exists()


def test_folder_without_a_model(raw, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    raw["student"]["model"] = str(tmp_path / "empty")
    _fails(
        capsys, ["train", str(write_yaml(raw, tmp_path / "c.yaml"))], "cannot load the student", "student."
    )
    assert not Path(raw["output_dir"]).exists()


def test_data_that_is_not_utf8(raw, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait, crème brûlée\n".encode("latin-1") * 20)
    raw["data"]["train"] = [str(bad)]
    _fails(
        capsys,
        ["train", str(write_yaml(raw, tmp_path / "c.yaml"))],
        "latin1.txt",
        "not valid UTF-8",
        "convert it",
    )
    assert not Path(raw["output_dir"]).exists()


@pytest.mark.parametrize(
    ("content", "expected"), [("", "no non-empty documents"), ("x = 1\n", "fewer than one")]
)
def test_empty_or_too_little_data(raw, tmp_path, capsys, content, expected):
    data = tmp_path / "small.txt"
    data.write_text(content)
    raw["data"]["train"] = [str(data)]
    raw["train"]["batch_size"] = 4
    _fails(capsys, ["train", str(write_yaml(raw, tmp_path / "c.yaml"))], expected)
    assert not Path(raw["output_dir"]).exists()


def test_invalid_yaml(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: [1e-4\n  batch_size: 2\n")
    _fails(capsys, ["train", str(config)], "c.yaml", "not valid YAML", "line")


def test_unknown_key(raw, tmp_path, capsys):
    raw["train"]["learning_rate"] = 1e-4
    _fails(capsys, ["train", str(write_yaml(raw, tmp_path / "c.yaml"))], "train.learning_rate: unknown key")


def test_every_problem_is_reported_at_once(raw, tmp_path, capsys):
    raw["train"].update(lr=-1e-3, batch_size=0)
    raw["data"]["max_length"] = 4
    raw["distill"] = {"divergence": "kl"}
    line = _fails(
        capsys,
        ["train", str(write_yaml(raw, tmp_path / "c.yaml"))],
        "train.lr",
        "-0.001",
        "train.batch_size",
        "data.max_length",
        "distill.divergence",
    )
    assert line.count("error:") == 1


def test_bad_override(raw, tmp_path, capsys):
    config = write_yaml(raw, tmp_path / "c.yaml")
    _fails(capsys, ["train", str(config), "--set", "train.lr"], "train.lr", "section.key=value")
    _fails(capsys, ["train", str(config), "--set", "train.lr=-1"], "train.lr")


def test_tokenizer_without_offsets(raw, tmp_path, capsys):
    """A slow (pure Python) tokenizer cannot give character offsets, which alignment needs."""
    folder = tmp_path / "byt5"
    ByT5Tokenizer().save_pretrained(folder)
    LlamaConfig(
        vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(folder)
    raw["student"]["model"] = str(folder)
    _fails(
        capsys,
        ["train", str(write_yaml(raw, tmp_path / "c.yaml"))],
        "student tokenizer",
        "offsets",
        "fast tokenizer",
    )
    assert not Path(raw["output_dir"]).exists()


def test_output_dir_holding_a_run_is_not_overwritten(raw, tmp_path, capsys):
    config = write_yaml(raw, tmp_path / "c.yaml")
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    run = Path(raw["output_dir"])
    before = _snapshot(run)
    assert "config.yaml" in before and "final/model.safetensors" in before
    _fails(capsys, ["train", str(config)], "already holds a run", "--resume auto", "another output_dir")
    assert _snapshot(run) == before


def test_eval_of_a_missing_model(tmp_path, assets, capsys):
    _fails(
        capsys,
        ["eval", "--student", str(tmp_path / "missing"), "--data", str(assets["eval"])],
        "cannot load the student",
    )


def _sakd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sakd", *args], capture_output=True, text=True, timeout=600)


def test_real_exit_status_and_stderr(raw, tmp_path):
    """The installed entry point, in a subprocess: the status and the stream are the real ones."""
    config = tmp_path / "bad.yaml"
    config.write_text("student: {model: x\n")
    done = _sakd("train", str(config))
    assert done.returncode == 2 and done.stdout == ""
    assert "not valid YAML" in _one_error_line(done.stderr)

    raw["student"]["model"] = str(tmp_path / "missing")
    raw["train"]["lr"] = -1
    done = _sakd("train", str(write_yaml(raw, tmp_path / "c.yaml")))
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "train.lr" in line and "student.model" in line
    assert not Path(raw["output_dir"]).exists()


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        ({"target_modules": ["q_proj", "lm_head"]}, "includes the LM head"),
        ({"target_modules": ["no_such_layer"]}, "do not fit"),
        ({"r": 0}, "student.lora.r"),
    ],
)
def test_lora_targets_sakd_cannot_train(raw, tmp_path, capsys, lora, expected):
    pytest.importorskip("peft")
    raw["student"]["lora"] = lora
    _fails(capsys, ["train", str(write_yaml(raw, tmp_path / "c.yaml"))], expected)
    assert not Path(raw["output_dir"]).exists()


def test_missing_peft_or_wandb_says_how_to_install(raw, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # importing them now raises ImportError
    monkeypatch.setitem(sys.modules, "wandb", None)
    raw["student"]["lora"] = {"r": 4}
    _fails(capsys, ["train", str(write_yaml(raw, tmp_path / "c.yaml"))], "pip install peft")
    del raw["student"]["lora"]
    raw["train"]["report_to"] = ["wandb"]
    _fails(capsys, ["train", str(write_yaml(raw, tmp_path / "c.yaml"))], "pip install wandb")
    assert not (Path(raw["output_dir"]) / "config.yaml").exists(), "a retry would be refused as a resume"
