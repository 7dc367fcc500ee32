"""`sakd eval` through the real CLI: the JSON keys, agreement, sizes, speed, the table, and user errors."""

from __future__ import annotations

import json

import pytest

from sakd.cli import main


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", "--max-length", "48", "--max-windows", "3", "--gen-new-tokens", "2", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_json_has_the_old_and_new_keys(assets, tmp_path, capsys):
    output = tmp_path / "eval.json"
    code, out, _ = _eval(
        capsys,
        *("--student", str(assets["student"]), "--teacher", str(assets["teacher"])),
        *("--data", str(assets["eval"]), "--format", "json", "--output", str(output)),
    )
    assert code == 0
    result = json.loads(out)
    assert json.loads(output.read_text()) == result
    for role in ("student", "teacher"):
        m = result[role]
        for key in ("perplexity", "bits_per_byte", "loss", "tokens", "bytes", "parameters", "windows"):
            assert key in m
        assert m["size_on_disk_bytes"] == (assets[role] / "model.safetensors").stat().st_size
        assert m["generation"]["prompts"] == 4 and m["generation"]["new_tokens"] == 8
        assert m["generation"]["tokens_per_s"] > 0
    assert result["compression_ratio"] == result["teacher"]["parameters"] / result["student"]["parameters"]
    agreement = result["agreement"]
    assert agreement["top_k"] == 5 and agreement["positions"] > 0 and agreement["windows"] == 3
    assert 0 <= agreement["top1_agreement"] <= 1 and 0 <= agreement["top_k_overlap"] <= 1
    assert agreement["kl"] > 0 and agreement["kl_kind"].startswith("teacher projected")


def test_eval_table_of_a_student_that_is_its_own_teacher(assets, capsys):
    same = str(assets["student_same"])
    code, out, _ = _eval(capsys, "--student", same, "--teacher", same, "--data", str(assets["eval"]))
    assert code == 0
    lines = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in out.splitlines()
        if line.count("│") == 3
    }
    assert lines["top-1 agreement"] == "1.0000" and lines["top-5 overlap"] == "1.0000"
    assert float(lines["KL(teacher || student)"]) == pytest.approx(0, abs=1e-5)
    assert lines["compression ratio (parameters)"] == "1.00x"
    assert "bits/byte" in out and "greedy tokens/s" in out


def test_eval_without_a_teacher_and_a_missing_model(assets, tmp_path, capsys):
    code, out, _ = _eval(
        capsys, "--student", str(assets["student"]), "--data", str(assets["eval"]), "--format", "json"
    )
    result = json.loads(out)
    assert code == 0 and "teacher" not in result and "agreement" not in result
    code, out, err = _eval(capsys, "--student", str(tmp_path / "nope"), "--data", str(assets["eval"]))
    assert code == 2 and err.startswith("error: cannot load the student") and "Traceback" not in err
