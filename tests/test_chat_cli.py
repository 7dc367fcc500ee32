"""Chat data through the real CLI on tiny models whose tokenizers and chat templates differ: `sakd train`
distils on assistant content, `sakd eval` scores completion bytes only, `sakd generate --chat` answers a user
message, and bad chat data stops with one `error:` line naming the file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from chat_kinds import chat_tokenizer, conversation, write_chat_jsonl
from helpers import metrics_records, write_yaml
from transformers import AutoModelForCausalLM

from sakd.cli import main
from sakd.eval.run import EvalData, run_eval
from sakd.models.tiny import dense_student_config, moe_teacher_config

EVAL_ROWS = range(30, 36)


@pytest.fixture(scope="module")
def chat_assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    teacher_tok, student_tok = chat_tokenizer("chatml"), chat_tokenizer("llama3")
    bare_tok = chat_tokenizer("llama3")
    bare_tok.chat_template = None
    specs = {
        "teacher": (
            moe_teacher_config(len(teacher_tok), hidden_size=48, layers=2, heads=4, experts=4),
            teacher_tok,
        ),
        "student": (dense_student_config(len(student_tok), hidden_size=32, layers=2, heads=2), student_tok),
        "bare_student": (dense_student_config(len(student_tok), hidden_size=32, layers=2, heads=2), bare_tok),
    }
    out = {"root": root}
    for name, (cfg, tok) in specs.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    out["train"] = write_chat_jsonl(root / "train.jsonl", 24)
    out["eval"] = write_chat_jsonl(root / "eval.jsonl", len(EVAL_ROWS), EVAL_ROWS.start)
    out["template"] = root / "llama3.jinja"
    out["template"].write_text(student_tok.chat_template)
    return out


def _config(assets: dict[str, Path], tmp_path: Path, **student) -> Path:
    raw = {
        "teacher": {"model": str(assets["teacher"])},
        "student": {"model": str(assets["student"]), **student},
        "data": {"train": [str(assets["train"])], "eval": [str(assets["eval"])], "max_length": 192},
        "train": {"max_steps": 3, "batch_size": 2, "warmup_steps": 0, "lr": 1e-3, "progress": False},
        "output_dir": str(tmp_path / "run"),
    }
    return write_yaml(raw, tmp_path / "chat.yaml")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_train_on_messages_between_two_templates(chat_assets, tmp_path):
    assert main(["train", str(_config(chat_assets, tmp_path)), "--set", "train.log_every=1"]) == 0
    records = metrics_records(tmp_path / "run")
    steps = [r for r in records if r.get("event") == "train"]
    assert len(steps) == 3
    assert all(math.isfinite(r["loss"]) and r["loss_kd"] > 0 and r["loss_lm"] > 0 for r in steps)
    # both models are scored on the same completion bytes, whatever their templates put around them
    (before,) = [r for r in records if r.get("event") == "before_training"]
    contents = [m["content"] for i in EVAL_ROWS for m in conversation(i) if m["role"] == "assistant"]
    assert before["teacher"]["bytes"] == before["student"]["bytes"] == sum(len(c.encode()) for c in contents)


def test_eval_scores_completion_bytes_only(chat_assets):
    result = run_eval(
        str(chat_assets["student"]),
        str(chat_assets["teacher"]),
        EvalData([str(chat_assets["eval"])]),
        gen_new_tokens=0,
    )
    contents = [m["content"].strip() for i in EVAL_ROWS for m in conversation(i) if m["role"] == "assistant"]
    student = result["student"]
    assert student["bytes"] == result["teacher"]["bytes"] == sum(len(c.encode()) for c in contents)
    assert result["agreement"]["positions"] > 0
    # each content token and each turn's <|eot_id|> is a target, nothing else
    assert math.isclose(
        student["bits_per_byte"], student["loss"] * student["tokens"] / math.log(2) / student["bytes"]
    )


def test_generate_chat_renders_the_template(chat_assets, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(chat_assets["student"]),
                "--prompt",
                "hi",
                "--chat",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert main(["generate", "--model", str(chat_assets["bare_student"]), "--prompt", "hi", "--chat"]) == 2
    assert "has no chat template" in _one_error_line(capsys)


def test_missing_template_is_an_error_unless_the_config_gives_one(chat_assets, tmp_path, capsys):
    config = _config(chat_assets, tmp_path, model=str(chat_assets["bare_student"]))
    assert main(["train", str(config)]) == 2
    line = _one_error_line(capsys)
    assert "train.jsonl' line 1 is chat data but the student tokenizer has no chat template" in line
    assert "student.chat_template=PATH" in line
    overrides = ["--set", f"student.chat_template={chat_assets['template']}", "--set", "train.max_steps=1"]
    assert main(["train", str(config), *overrides]) == 0


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
            "line 3: messages[0] has no 'role'",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
            "line 3: messages[1] is an empty assistant turn",
        ),
        ({"messages": {"role": "user", "content": "hi"}}, "line 3: 'messages' must be a non-empty list"),
        (
            {"question": "hi", "answer": "x"},
            "line 3 has no string 'text' field and matches no other format (fields: answer, question)",
        ),
    ],
)
def test_bad_chat_data_exits_2_naming_file_and_line(chat_assets, tmp_path, capsys, row, expected):
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps({"messages": conversation(i)}) for i in range(2)] + [json.dumps(row)]
    bad.write_text("\n".join(rows) + "\n")
    config = _config(chat_assets, tmp_path)
    assert main(["train", str(config), "--set", f"data.train=[{bad}]"]) == 2
    line = _one_error_line(capsys)
    assert "bad.jsonl" in line and expected in line


def test_chat_prompt_ids_match_the_tokenizers_own_rendering(chat_assets):
    from transformers import AutoTokenizer

    from sakd.generate import _generation_config, _prompt_ids

    tok = AutoTokenizer.from_pretrained(chat_assets["student"])
    ids = _prompt_ids(tok, "hi", torch.device("cpu"), chat=True)[0].tolist()
    messages = [{"role": "user", "content": "hi"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == list(expected) and ids[0] == tok.bos_token_id
    stop = _generation_config(tok, 4, 0.0, False, chat=True).eos_token_id
    assert tok.convert_tokens_to_ids("<|eot_id|>") in stop and tok.eos_token_id in stop


def test_the_chat_example_config_is_valid():
    from sakd.config import PathSource, read_yaml, validate

    path = Path(__file__).parents[1] / "configs" / "chat" / "smollm2-instruct-from-qwen3moe.yaml"
    cfg = validate(read_yaml(path), check_files=False)
    assert isinstance(cfg.data.train[0], PathSource) and cfg.data.train[0].format == "messages"
    assert f"sakd train configs/chat/{path.name}" in path.read_text()
