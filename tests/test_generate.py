"""`sakd generate`: greedy decoding is a plain argmax loop and deterministic; sampling follows the seed."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sakd.cli import main
from sakd.generate import generate_ids

PROMPT = "def main(args):\n    "


def _generate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_generation_is_the_argmax_continuation(assets, capsys):
    tok = AutoTokenizer.from_pretrained(assets["teacher"])
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"]).eval()
    ids = tok(PROMPT)["input_ids"]
    expected = []
    with torch.no_grad():
        for _ in range(6):
            next_id = int(model(torch.tensor([ids + expected])).logits[0, -1].argmax())
            if next_id == tok.eos_token_id:
                break
            expected.append(next_id)
    assert expected, "the tiny teacher ends at once: pick another prompt"
    assert generate_ids(model, tok, PROMPT, max_new_tokens=6).tolist() == expected

    args = ("--model", str(assets["teacher"]), "--prompt", PROMPT, "--max-new-tokens", "6")
    code, first, _ = _generate(capsys, *args)
    assert code == 0
    assert first == tok.decode(expected, skip_special_tokens=True) + "\n"
    assert _generate(capsys, *args)[1] == first


def test_sampling_follows_the_seed_and_bad_values_are_user_errors(assets, capsys):
    args = ("--model", str(assets["student"]), "--prompt", "import ", "--max-new-tokens", "12")
    runs = [_generate(capsys, *args, "--temperature", "1.5", "--seed", seed)[1] for seed in ("1", "1", "2")]
    assert runs[0] == runs[1] != runs[2]
    code, _, err = _generate(capsys, *args, "--temperature", "-1")
    assert code == 2 and err.startswith("error: --temperature")
    code, _, err = _generate(
        capsys, "--model", str(assets["student"]), "--prompt", "x", "--max-new-tokens", "0"
    )
    assert code == 2 and err.startswith("error: --max-new-tokens")
