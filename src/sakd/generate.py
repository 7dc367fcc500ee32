"""Text generation with a trained model: `sakd generate`, and the decoding speed that `sakd eval` reports.

Greedy at temperature 0 (deterministic), sampling otherwise (seeded). The prompt starts with the special
tokens the model's tokenizer puts before text; an empty prompt of a model without any starts from EOS (packed
training data puts EOS between documents, so it is where a document starts). With `chat`, the prompt is a user
message rendered by the model's chat template up to where the assistant's answer starts, and the answer ends
at the template's end-of-turn token as well as at EOS.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from sakd.data.chat import chat_prompt, turn_end_id
from sakd.data.tokenize import special_prefix
from sakd.errors import UserError

# A fixed prompt set, so that speeds of two models (or two runs) are comparable.
SPEED_PROMPTS = (
    "The history of the city begins",
    "In mathematics, a function is",
    "def main():\n    ",
    "Once upon a time, there was",
)


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str, device: torch.device, chat: bool = False
) -> torch.Tensor:
    """The model's own prefix tokens (a BOS where its tokenizer adds one), then the prompt's tokens; never the
    special tokens a tokenizer puts after text (an EOS or separator would end the prompt)."""
    prompt = chat_prompt(tokenizer, prompt) if chat else prompt
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    ids = [*special_prefix(tokenizer), *text_ids]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise UserError("the prompt is empty and the tokenizer has no BOS or EOS token: give a prompt")
        ids = [start]
    return torch.tensor([ids], device=device)  # (1, T)


def _generation_config(
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    temperature: float,
    exact_length: bool,
    chat: bool = False,
) -> GenerationConfig:
    """A complete config, so that the model's own defaults (often sampling settings) do not leak in."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn_end = turn_end_id(tokenizer) if chat else None
    stop += [turn_end] if turn_end is not None and turn_end not in stop else []
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens if exact_length else None,
        **(sampling if temperature > 0 else {"do_sample": False}),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=(stop if len(stop) > 1 else tokenizer.eos_token_id),
        bos_token_id=tokenizer.bos_token_id,
    )


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    exact_length: bool = False,
    chat: bool = False,
) -> torch.Tensor:
    """The new token ids (T_new,) the model writes after `prompt` (a user message for its chat template when
    `chat`); `exact_length` never stops at EOS."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {temperature}")
    device = next(model.parameters()).device
    ids = _prompt_ids(tokenizer, prompt, device, chat)
    was_training = model.training
    model.eval()
    if temperature > 0:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=_generation_config(tokenizer, max_new_tokens, temperature, exact_length, chat),
    )
    model.train(was_training)
    return out[0, ids.shape[1] :]


def generate_text(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = False,
) -> str:
    """What the model writes after `prompt` (the prompt itself is not repeated)."""
    new = generate_ids(model, tokenizer, prompt, max_new_tokens, temperature, seed, chat=chat)
    return tokenizer.decode(new, skip_special_tokens=True)


def generation_speed(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: tuple[str, ...] = SPEED_PROMPTS,
    max_new_tokens: int = 32,
) -> dict[str, Any]:
    """Greedy decoding speed at batch size 1: each prompt is extended by exactly `max_new_tokens` tokens
    after one untimed warm-up. Returns tokens per second and the mean latency per prompt."""
    device = next(model.parameters()).device
    generate_ids(model, tokenizer, prompts[0], min(4, max_new_tokens), exact_length=True)
    latencies = []
    new_tokens = 0
    for prompt in prompts:
        _sync(device)
        t0 = time.perf_counter()
        new = generate_ids(model, tokenizer, prompt, max_new_tokens, exact_length=True)
        _sync(device)
        latencies.append(time.perf_counter() - t0)
        new_tokens += int(new.numel())
    seconds = sum(latencies)
    return {
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
        "latency_s": seconds / len(prompts),
        "device": str(device),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_generate(
    model_ref: str,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    device: str | None = None,
    chat: bool = False,
) -> str:
    """`sakd generate`: load a model folder or hub id and return what it writes after `prompt` (with `chat`,
    as the answer to a user message in its chat template)."""
    from sakd.models.load import load_model, load_tokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(model_ref, "model")
    model = load_model(model_ref, "model", torch.float32).to(dev)
    return generate_text(model, tokenizer, prompt, max_new_tokens, temperature, seed, chat)
