"""The start-up head check through the real entry points: a model whose forward transforms its logits in a
way sakd's head does not reproduce is refused before the first step (training), before any metric (eval) and
before anything is cached (cache-teacher)."""

from __future__ import annotations

import logging

import pytest

from sakd.cache import capture as capture_module
from sakd.cache import capture_teacher_cache
from sakd.cli import main
from sakd.config import validate
from sakd.errors import UserError
from sakd.eval import run as eval_run
from sakd.train import step as step_module
from sakd.train.loop import train


def _with_extra_scale(load, role_to_patch: str, factor: float = 1.3):
    """`load_model` whose `role_to_patch` model scales its logits in forward, unknown to sakd."""

    def loading(ref, role, *args, **kwargs):
        model = load(ref, role, *args, **kwargs)
        if role == role_to_patch:
            original = model.forward

            def forward(*f_args, **f_kwargs):
                out = original(*f_args, **f_kwargs)
                out.logits = out.logits * factor
                return out

            model.forward = forward
        return model

    return loading


def test_training_refuses_a_teacher_whose_logits_sakd_cannot_reproduce(make_raw, monkeypatch):
    monkeypatch.setattr(step_module, "load_model", _with_extra_scale(step_module.load_model, "teacher"))
    raw = make_raw("refused", max_steps=2, warmup_steps=1)
    with pytest.raises(
        UserError, match=r"the teacher's \(Qwen3MoeForCausalLM\) logits differ from sakd's head by"
    ):
        train(validate(raw))


def test_training_checks_both_heads_and_logs_them(make_raw, caplog):
    with caplog.at_level(logging.INFO, logger="sakd"):
        train(validate(make_raw("checked", max_steps=2, warmup_steps=1, grad_accum=1)))
    passed = [r.getMessage() for r in caplog.records if "head check passed" in r.getMessage()]
    assert [line.split()[0] for line in passed] == ["student", "teacher"]
    assert all("logit transform: none" in line for line in passed)


def test_eval_refuses_a_student_whose_logits_sakd_cannot_reproduce(assets, monkeypatch, capsys):
    monkeypatch.setattr(eval_run, "load_model", _with_extra_scale(eval_run.load_model, "student"))
    code = main(
        ["eval", "--student", str(assets["student"]), "--data", str(assets["eval"]), "--max-windows", "2"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(
        "error: the student's (LlamaForCausalLM) logits differ from sakd's head"
    )


def test_cache_capture_refuses_a_teacher_whose_logits_sakd_cannot_reproduce(
    base_config, monkeypatch, tmp_path
):
    monkeypatch.setattr(capture_module, "load_model", _with_extra_scale(capture_module.load_model, "teacher"))
    base_config["output_dir"] = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"the teacher's \(Qwen3MoeForCausalLM\) logits differ"):
        capture_teacher_cache(
            validate(base_config), top_k=4, path=tmp_path / "c", device="cpu", progress=False
        )
    assert not list((tmp_path / "c").glob("shard-*"))
