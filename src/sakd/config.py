"""The run configuration: typed, nested, validated in one place.

A config is a YAML file plus ``--set section.key=value`` overrides. Every problem (wrong type, value out of
range, unknown key, missing file) is collected and reported at once as a `UserError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sakd.config_paths import file_problems
from sakd.curriculum import CurriculumSpec
from sakd.errors import UserError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
DataFormat = Literal["messages", "prompt_completion", "text"]
CACHE_UNAVAILABLE_LOSSES = ("feature", "attention", "router", "balance", "layerwise", "contrastive")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HFSource(Section):
    """A Hugging Face dataset, loaded with `datasets.load_dataset(hf, config, split=split)`."""

    hf: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    format: DataFormat | None = None
    """Force the row format (null: detected from each row's fields)."""


class PathSource(Section):
    """A file or folder whose rows are read in one forced format."""

    path: str
    format: DataFormat | None = None
    """messages, prompt_completion or text (null: detected from each row's fields)."""


Source = str | HFSource | PathSource


class ModelSpec(Section):
    model: str
    """Hub id, local folder or GGUF file (dequantized on load; needs the gguf package) of a causal LM."""
    tokenizer: str | None = None
    """Hub id, folder or GGUF file of the tokenizer; defaults to `model`."""
    dtype: Precision = "auto"
    """Weights' dtype. auto: fp32 on CPU; on GPU bf16 where supported, else fp16 (teacher) / fp32 (student)."""
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"
    """auto picks sdpa unless a loss needs attention maps (then eager, since sdpa returns none)."""
    chat_template: str | None = None
    """A file holding a Jinja chat template, for chat data when the tokenizer has none (or to replace its own)."""

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model


class TeacherSpec(ModelSpec):
    cache: str | None = None
    """Folder of a teacher cache (`sakd cache-teacher`): train from its stored top-k distributions instead of
    running the teacher, which is then not loaded (only its tokenizer is). The losses that need the teacher's
    hidden states or attention (feature, attention, router, balance, layerwise, contrastive) are unavailable."""
    placement: Literal["replicate", "shard", "offload"] = "replicate"
    """replicate: a full copy on every device. shard: split over the processes with FSDP2 (each layer's
    weights are gathered for its forward only). offload: weights stay in host memory and each layer is moved
    to the device for its forward (slow, but the teacher needs no device memory)."""


class LoraSpec(Section):
    """Low-rank adapters (LoRA, through peft): the student's weights stay frozen and only the adapters train."""

    r: int = Field(8, ge=1)
    """Rank of each adapter: a targeted (out x in) weight gets r x (in + out) trainable parameters."""
    alpha: float = Field(16.0, gt=0.0)
    """The adapters' output is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on each adapter's input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Names (or name suffixes) of the linear layers to adapt; all-linear: every linear layer but the LM head.
    The LM head cannot be a target (sakd applies it from its weight)."""


class StudentSpec(ModelSpec):
    init: Literal["pretrained", "random"] = "pretrained"
    """random: build the student from its config with fresh weights."""
    lora: LoraSpec | None = None
    """Train low-rank adapters instead of every weight (null: full fine-tuning)."""


class DataConfig(Section):
    train: list[Source] = Field(min_length=1)
    """Sources: .txt, .jsonl (`text`, `messages` or `prompt` + `completion` rows), a folder of those, an HF
    dataset, or `{path: F, format: messages|prompt_completion|text}`."""
    eval: list[Source] = Field(default_factory=list)
    """Held-out sources; without them no evaluation runs during training."""
    max_length: int = Field(256, ge=8, le=1_048_576)
    """Tokens per window, the limit on each side (teacher and student)."""
    eval_max_windows: int | None = Field(256, ge=1)
    """Evaluate on at most this many held-out windows (all when null)."""


class DistillConfig(Section):
    """How the losses are computed; their weights and the temperature come from `curriculum:`."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_rkl", "akl", "taid"] = (
        "forward_kl"
    )
    """Same-vocabulary divergence, also used on projected teacher distributions (skew_kl / skew_rkl:
    DistiLLM's skew KL and skew reverse KL; akl: adaptive KL, a per-token mix of forward and reverse KL by
    where the two distributions differ (same vocabulary only); taid: KL to TAID's target interpolated between
    the student and the teacher)."""
    jsd_beta: float = Field(0.5, ge=0.0, le=1.0)
    skew_alpha: float = Field(0.1, ge=0.0, lt=1.0)
    """How much of the other side the skew divergences mix into the compared distribution."""

    akl_mu: float = Field(0.5, ge=0.0, lt=1.0)
    """akl: the teacher's head holds its most likely tokens up to this much probability mass."""
    taid_t_start: float = Field(0.4, ge=0.0, le=1.0)
    """taid: the target's share of the teacher at the start of training; it rises linearly to taid_t_end."""
    taid_t_end: float = Field(1.0, ge=0.0, le=1.0)

    @property
    def divergence_parameter(self) -> float:
        """The chosen divergence's own parameter (at the start of training): jsd's beta, the skew divergences'
        alpha, akl's mu, taid's t."""
        by_name = {"akl": self.akl_mu, "taid": self.taid_t_start, "skew_kl": self.skew_alpha}
        return by_name.get(
            self.divergence, self.skew_alpha if self.divergence == "skew_rkl" else self.jsd_beta
        )

    cross_vocab: Literal["projection", "uld", "hybrid"] = "projection"
    """How the teacher's distribution is compared when the vocabularies differ."""
    projection_rows: Literal["consistent", "all"] = "consistent"
    """With the projection across tokenizers, the distillation rows whose KD runs. The projection gives each
    teacher token's probability to the first student token of that token's own text, so at a group end it
    predicts the student's next token only when the student's tokenization of what follows starts with
    that token. "consistent": KD runs only where it does for the data itself, that is where the teacher's
    actual next token projects onto the student's actual next token; at the other rows the student's next
    token is longer than the teacher's, or tokenized otherwise in context, and the projected target would
    pull the student away from its own label. Those rows keep the LM loss (and the chunk-likelihood term).
    "all": every group end. A teacher cache keeps every row it captured."""
    chunk_likelihood_weight: float | None = Field(None, ge=0.0)
    """Approximate likelihood matching: each aligned group's text gets, from the student, the probability
    the teacher gives it (its tokens' probabilities multiplied, each model in its own tokenization), which
    reaches every student position of the group, not only its last one. This weight times the curriculum's
    KD weight scales the term; 0: off. null (the default): 1 with two tokenizers and the live teacher, off
    with one tokenizer (every position already gets the teacher's whole distribution) or a teacher cache
    (which holds no per-token log-probabilities; a number > 0 with a cache is refused)."""
    chunk_likelihood_temperature: float = Field(100.0, gt=0.0)
    """The chunk probabilities are compared as exp(log-probability / this), which keeps long chunks' gradients
    from vanishing."""
    on_policy_fraction: float = Field(0.0, ge=0.0, le=1.0)
    """On-policy distillation (GKD's lambda): the share of micro-batches whose text the student writes itself.
    Such a micro-batch keeps the first `on_policy_prompt_tokens` student tokens of each window as a prompt,
    samples `on_policy_new_tokens` more from the current student (at `on_policy_temperature`, stopping at its
    EOS), and is distilled on that text, tokenized and aligned afresh for both models, so the teacher judges
    what the student itself would write. The sampled tokens carry no LM loss. Which micro-batches are drawn
    depends only on the seed and the step, so a resumed run draws the same ones. 0: off. Needs the live
    teacher and plain text data (not chat)."""
    on_policy_prompt_tokens: int = Field(32, ge=1)
    on_policy_new_tokens: int = Field(64, ge=1)
    on_policy_temperature: float = Field(1.0, gt=0.0)
    chunk_size: int = Field(1024, ge=1)
    """Rows per chunk when projecting hidden states through the LM heads."""
    chunk_logits: int | None = Field(None, ge=1)
    """At most this many rows x vocabulary logits per chunk: with a large vocabulary a chunk holds fewer than
    `chunk_size` rows, so the loss's peak memory does not grow with the vocabulary. null: 2**26 on a GPU (256
    MiB per fp32 (rows x vocabulary) tensor; 441 rows at 151,936), where a chunk's cost is its kernel launches
    and few large chunks are fastest; 2**21 on a CPU (8 MiB; 13 rows at 151,936), where the chunk's tensors
    are reused from chunk to chunk, so that small chunks cost little more time in a 32nd of the memory. A
    chunk keeps at least hidden / 8 rows of the widest head whatever the bound (`chunk_rows`)."""
    fused_loss: bool = True
    """Forward KL and JSD (same vocabulary or projection; forward KL from a cache too) use closed-form logit
    gradients instead of autograd through the loss: the same result with fewer (rows x vocabulary) tensors per
    chunk."""
    layer_map: list[tuple[int, int]] | None = None
    """(student, teacher) indices into the models' hidden_states (0 = embeddings) for the layer-wise loss;
    null: `layerwise_pairs` evenly spaced pairs."""
    layerwise_pairs: int = Field(2, ge=1)
    attention_loss: Literal["kl", "mse"] = "kl"
    """Attention transfer compares last-layer maps pooled onto aligned groups (needs eager attention)."""
    contrastive_temperature: float = Field(0.1, gt=0.0)
    """Fixed (never learned) InfoNCE temperature."""

    def chunk_logits_on(self, device_type: str) -> int:
        """`chunk_logits`, or its default for a device of this type ("cpu", "cuda", ...)."""
        if self.chunk_logits is not None:
            return self.chunk_logits
        return 2**21 if device_type == "cpu" else 2**26


class RouterConfig(Section):
    """The student-aware router (its loss weights and top-k schedule live in `curriculum:`)."""

    num_sources: int = Field(4, ge=1)
    """Knowledge sources of a dense teacher (evenly spaced layers); an MoE teacher uses its experts."""
    moe_layer: int | None = None
    """Decoder layer whose experts are the sources (null: the middle MoE layer)."""
    include_shared_expert: bool = True
    dim: int = Field(128, ge=1)
    """Query/key width."""
    lr: float | None = Field(None, gt=0.0)
    """Learning rate of the router and projection heads (null: train.lr)."""
    min_weight: float = Field(0.25, ge=0.0, le=1.0)
    max_weight: float = Field(4.0, ge=1.0)
    """Bounds of the KD token weights (which have mean 1)."""


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps (each covers batch_size x grad_accum windows per process)."""
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup in optimizer steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    weight_decay: float = Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = 0
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every process holds the whole student. fsdp: the student's weights, gradients and optimizer
    state are split over the processes (PyTorch FSDP2); checkpoints hold the full weights either way."""
    precision: Precision = "auto"
    compile: bool = False
    """Compile every decoder layer's forward, of the student and of a teacher on the device, with
    torch.compile (inductor). Worth it on a GPU; the first steps take longer while it compiles."""
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)
    """Evaluate every N optimizer steps (0: only at the end)."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)
    max_minutes: float | None = Field(None, gt=0.0)
    """Wall-clock budget: save a checkpoint and stop cleanly when it is spent."""
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0)
    """EMA of the student's weights (null: off); the decay warms up from 0."""
    nonfinite_max_rate: float = Field(0.01, ge=0.0, le=1.0)
    nonfinite_window: int = Field(100, ge=1)
    """Stop when more than nonfinite_max_rate of the last nonfinite_window steps were skipped."""
    early_stop_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a better held-out bits per byte (null: never)."""
    early_stop_min_steps: int = Field(0, ge=0)
    progress: bool = True
    report_to: list[Literal["tensorboard", "wandb"]] | None = None
    """Trackers that receive the metrics besides metrics.jsonl (always written): tensorboard (event files in
    output_dir/tensorboard), wandb (needs `pip install wandb`); [] for none. null: what `tensorboard` and
    `wandb_project` say."""
    tensorboard: bool = True
    """TensorBoard event files in output_dir/tensorboard; ignored when report_to is set."""
    wandb_project: str | None = None
    """The Weights & Biases project (default `sakd`); when report_to is null, setting it turns W&B on."""

    @property
    def trackers(self) -> list[str]:
        """The trackers this run reports to: report_to, or the older tensorboard / wandb_project settings."""
        if self.report_to is not None:
            return list(dict.fromkeys(self.report_to))
        legacy = ["tensorboard"] if self.tensorboard else []
        return legacy + (["wandb"] if self.wandb_project else [])


class Config(Section):
    teacher: TeacherSpec | None = None
    """The teacher; without it the student trains on the LM loss alone (the baseline)."""
    student: StudentSpec
    data: DataConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    curriculum: CurriculumSpec = Field(default_factory=CurriculumSpec)
    router: RouterConfig = Field(default_factory=RouterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str

    @model_validator(mode="after")
    def _check_consistency(self) -> Config:
        problems = []
        if self.train.warmup_steps > self.train.max_steps:
            problems.append("train.warmup_steps exceeds train.max_steps")
        if self.teacher is not None and self.teacher.cache:
            weights = self.curriculum.weights
            need_teacher = [k for k in CACHE_UNAVAILABLE_LOSSES if getattr(weights, k) > 0]
            if need_teacher:
                problems.append(
                    f"teacher.cache holds no teacher hidden states or attention: set curriculum.weights."
                    f"{{{','.join(need_teacher)}}} to 0 or drop teacher.cache"
                )
        problems += self._on_policy_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _on_policy_problems(self) -> list[str]:
        d = self.distill
        if d.on_policy_fraction == 0:
            return []
        problems = []
        if self.teacher is None or self.teacher.cache:
            problems.append(
                "distill.on_policy_fraction needs the live teacher: the student's own text has no cached "
                "teacher targets (drop teacher.cache, or set it to 0)"
            )
        if d.on_policy_prompt_tokens + d.on_policy_new_tokens > self.data.max_length:
            problems.append(
                f"distill.on_policy_prompt_tokens + on_policy_new_tokens ({d.on_policy_prompt_tokens} + "
                f"{d.on_policy_new_tokens}) exceeds data.max_length ({self.data.max_length})"
            )
        return problems


def _format_validation(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            problems.append(f"{loc}: missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg)
    return problems


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001); the value is parsed as YAML."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise UserError(f"--set {item!r}: '{k}' is not a section")
            node = node[k]
        node[keys[-1]] = value
    return raw


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file '{path}' is not valid YAML{where}: fix its syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections (teacher, student, data, ...)")
    return raw


def validate(raw: dict[str, Any], check_files: bool = True) -> Config:
    """Validate a raw mapping; every problem is reported at once in one `UserError`."""
    missing = file_problems(raw) if check_files else []
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        problems = _format_validation(e) + missing
    else:
        problems = missing
    if problems:
        raise UserError("invalid config: " + "; ".join(problems) + (": fix the paths" if missing else ""))
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    raw = read_yaml(path) if path else {}
    return validate(apply_overrides(raw, overrides or []))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
