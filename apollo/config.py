"""Typed run configuration: model shape, method, training and data, plus the presets.

Every field is a CLI flag (``--field-name``) and a YAML key (``section: {field: value}``).
Configs are frozen; overrides make new instances with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ApolloError(ValueError):
    """A problem with the user's input: reported as one line with exit code 2."""


# Architectures with presets (``models.hf_config``); each is a Hugging Face model_type in ``models.ADAPTERS``.
ARCHS = ("bert", "roberta", "gpt2", "llama")
MASKED_ARCHS = ("bert", "roberta")  # masked LM; the others are causal LMs


def _f(default, help_: str):
    """A config field with its CLI help text."""
    return field(default=default, metadata={"help": help_})


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _f("bert", "bert | roberta (masked LM, post-LN) | gpt2 (causal LM, pre-LN) | llama (causal LM, "
                           "pre-RMSNorm, rotary, SwiGLU)")
    layers: int = _f(12, "target depth L")
    hidden: int = _f(128, "hidden size")
    heads: int = _f(4, "attention heads")
    ffn: int = _f(512, "feed-forward width")
    vocab: int = _f(4096, "vocabulary size (the tokenizer is trained to at most this)")
    seq_len: int = _f(128, "tokens per block (also the position table size)")
    dropout: float = _f(0.0, "dropout probability")
    model_config: str = _f("", "any Hugging Face architecture: a config.json, a directory holding one, or an "
                               "AutoConfig name; layers, hidden, heads, ffn, vocab, seq_len and dropout set its "
                               "fields (default: the config's own sizes); --arch is then its model_type")


@dataclass(frozen=True)
class MethodConfig:
    method: str = _f("apollo", "scratch | stackbert | apollo | apollo-plus | bert2bert | ligo | zero-layer | "
                               "one-layer | gstack | midas | apollo-jump | apollo-twostep "
                               "(apollo.method.table.METHOD_TABLE)")
    stages: tuple[int, ...] = _f((), "live layers per stage; empty = the method's default")
    switch: tuple[float, ...] = _f((), "where each later stage starts; empty = the method's default")
    switch_unit: str = _f("fraction", "fraction (of the run) | step | epoch")
    sampler: str = _f("", "lvps | es | us | fs | none; empty = the method's default")
    growth: str = _f("", "interpolation | stacking | middle (MIDAS); empty = the method's default")
    moments: str = _f("", "AdamW state at growth: copy (new layers copy their source layer's) | reset "
                          "(layers start empty) | fresh (every parameter starts empty, as a new optimizer); empty "
                          "= the method's default")
    new_layers: str = _f("", "copy | zeroed (repeat copies start with zeroed residual outputs: function-"
                             "preserving growth) | random (repeat copies are fresh layers of the L-layer init); "
                             "empty = the method's default")
    rewarm: float = _f(-1.0, "after each growth, ramp the LR up again over this fraction of the run "
                             "(0 = off; negative = the method's default)")
    small_model: str = _f("", "bert2bert / ligo: the trained smaller run (its directory) to grow from")
    width_init: str = _f("", "bert2bert: aki | fpi (function-preserving); empty = aki")
    ligo_steps: int = _f(0, "ligo: steps that train the growth operator before the model; 0 = 100")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _f(16, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step (one depth drawn per micro-batch)")
    global_batch: int = _f(0, "sequences per optimizer step over all ranks; sets grad_accum = global_batch / "
                              "(batch_size x ranks) (0 = batch_size x grad_accum x ranks)")
    steps: int = _f(0, "run length: the first of steps / tokens / epochs that is > 0")
    tokens: int = _f(0, "run length in tokens")
    epochs: float = _f(0.0, "run length in epochs over the training blocks")
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay (none on biases and LayerNorm)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    warmup: float = _f(0.025, "linear warmup, as a fraction of the run")
    min_lr_ratio: float = _f(0.1, "the schedule decays to lr * min_lr_ratio")
    lr_schedule: str = _f("cosine", "cosine | wsd (warmup, constant, then decay over the last --decay-fraction) | "
                                    "linear (decay over the whole run after warmup)")
    decay_fraction: float = _f(0.2, "wsd: the final fraction of the run over which the LR decays")
    decay_shape: str = _f("linear", "wsd: linear | 1-sqrt decay")
    clip: float = _f(1.0, "max gradient norm (0 = off)")
    eval_every: int = _f(50, "steps between validation passes at full depth")
    eval_blocks: int = _f(200, "validation blocks per pass (0 = all)")
    seed: int = _f(0, "seed for init, data order, masks and depth draws")
    threads: int = _f(0, "torch threads (0 = torch's default)")
    progress: bool = _f(True, "show a progress bar")
    device: str = _f("auto", "auto (cuda if available, else cpu) | cpu | cuda")
    precision: str = _f("fp32", "fp32 | bf16 (autocast; weights and AdamW state stay fp32)")
    compile: bool = _f(False, "torch.compile each layer (recompiled after growth)")
    check_ranks: bool = _f(False, "debug: all-reduce checks that every rank draws the same depth and ends with the "
                                  "same weights")
    checkpoint_every: int = _f(0, "save a resumable checkpoint every K optimizer steps (0 = off)")
    keep_checkpoints: int = _f(2, "checkpoints kept, newest first (0 = all)")
    skip_nonfinite: int = _f(0, "skip up to this many steps whose loss or gradient is NaN/Inf (0 = stop at the first)")
    report_to: tuple[str, ...] = field(default=(), metadata={
        "help": "experiment trackers beside metrics.jsonl: tensorboard | wandb | trackio | none (several: "
                "comma-separated or repeated)", "extend": True})
    energy: str = _f("off", "energy (kWh) and CO2 of the training steps with codecarbon: off | auto (when codecarbon "
                            "is installed) | on (required)")
    country_iso_code: str = _f("USA", "--energy: 3-letter ISO code of the country whose grid carbon intensity turns "
                                      "kWh into kg CO2eq (codecarbon's table)")
    energy_tracking_mode: str = _f("process", "--energy: process (CPU load and RAM of this process) | machine (the "
                                              "whole machine); RAPL and NVML counters always read whole devices")


@dataclass(frozen=True)
class DataConfig:
    data: tuple[str, ...] = _f((), "local text files; none (and no dataset) = the synthetic demo corpus")
    valid: tuple[str, ...] = _f((), "separate validation files; none = hold out valid_fraction of blocks")
    test: tuple[str, ...] = _f((), "test files, scored once at the end of the run (all blocks, full depth)")
    dataset: str = _f("", "a `datasets` name (e.g. wikitext), for users with internet")
    dataset_config: str = _f("", "e.g. wikitext-103-raw-v1")
    text_column: str = _f("text", "text column of a datasets dataset")
    valid_fraction: float = _f(0.05, "fraction of blocks held out for validation when no --valid is given")
    allow_overlap: bool = _f(False, "accept validation text that largely repeats the training text (refused "
                                    "otherwise: its loss would measure memorisation)")
    tokenizer: str = _f("", "a saved HF tokenizer directory; empty = train one on the training text")
    synthetic_sentences: int = _f(60000, "size of the built-in synthetic corpus")
    mlm_probability: float = _f(0.15, "masked-LM masking rate (80/10/10)")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out: str = "runs/apollo"
    preset: str = ""


SECTIONS = ("model", "method", "train", "data")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "wsd", "linear")  # apollo.method.lr_schedule.lr_at
DECAY_SHAPES = ("linear", "1-sqrt")


def default_ffn(arch: str, hidden: int) -> int:
    """4 x hidden; LLaMA's SwiGLU (3 matrices) uses 8/3 x hidden rounded up to a multiple of 8, which costs the
    FLOPs and parameters of a 4 x hidden two-matrix MLP (LLaMA paper, Sec. 2.2)."""
    return 8 * -(-hidden // 3) if arch == "llama" else 4 * hidden  # 8 * ceil(h / 3): 8/3 h, up to a multiple of 8


def _paper(arch: str, layers: int, hidden: int, heads: int) -> RunConfig:
    """Paper Table 5 sizes with the paper's training settings (bf16 aside)."""
    bert = arch in MASKED_ARCHS
    model = ModelConfig(arch, layers, hidden, heads, default_ffn(arch, hidden), 30522 if bert else 50257,
                        512 if bert else 1024, 0.1)
    # The paper's global batch (768 / 512 sequences) reached by gradient accumulation over micro-batches of 32.
    train = TrainConfig(batch_size=32, global_batch=768 if bert else 512, lr=1e-4, tokens=10**9, eval_every=1000)
    return RunConfig(model=model, train=train)


def _tiny(arch: str) -> RunConfig:
    """CPU preset: 12 layers, seq 128, sized so the layers dominate a step's FLOPs (see tests/test_config.py).

    llama-tiny's FFN is 344 (``default_ffn``), so its layers cost what gpt-tiny's do (within 1%) and runs compare."""
    model = ModelConfig(arch, 12, 128, 4, default_ffn(arch, 128), 4096, 128, 0.0)
    return RunConfig(model=model, train=TrainConfig(batch_size=16, lr=1e-3, tokens=3_000_000, eval_every=50))


_PRESETS = types.MappingProxyType(
    {
        "bert-tiny": lambda: _tiny("bert"),
        "gpt-tiny": lambda: _tiny("gpt2"),
        "roberta-tiny": lambda: _tiny("roberta"),
        "llama-tiny": lambda: _tiny("llama"),
        "bert-small": lambda: _paper("bert", 12, 512, 8),
        "bert-base": lambda: _paper("bert", 12, 768, 12),
        "bert-large": lambda: _paper("bert", 24, 1024, 16),
        "gpt-small": lambda: _paper("gpt2", 12, 512, 8),
        "gpt-base": lambda: _paper("gpt2", 12, 768, 12),
        "llama-base": lambda: _paper("llama", 12, 768, 12),
    }
)
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> RunConfig:
    if name not in _PRESETS:
        raise ApolloError(f"unknown preset {name!r} (choose from {', '.join(PRESET_NAMES)})")
    return dataclasses.replace(_PRESETS[name](), preset=name)


# ---- conversion: dict/YAML/CLI strings -> typed fields -------------------------------------------


def _coerce(value, tp, name: str):
    """Convert a YAML or CLI value to the field's declared type, or raise ApolloError."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if not isinstance(value, (list, tuple)):
            value = [value]
        if item is not str:  # numbers may come as "1,3,6,12" or "1 3 6 12"; paths are never split
            value = [p for v in value for p in (str(v).replace(",", " ").split() if isinstance(v, str) else [v])]
        return tuple(_coerce(v, item, name) for v in value)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if tp is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ApolloError(f"{name}: expected {tp.__name__}, got {value!r}") from None


def _hints(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def section_fields(section: str) -> dict[str, type]:
    cls = _hints(RunConfig)[section]
    return _hints(cls)


def from_dict(d: dict, base: RunConfig | None = None) -> RunConfig:
    """Apply a nested dict (as in config.yaml) on top of ``base``; unknown keys are errors."""
    cfg = base or RunConfig()
    if "preset" in d and d["preset"] and base is None:
        cfg = preset(str(d["preset"]))
    top = {}
    for key, value in d.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ApolloError(f"config section {key!r} must be a mapping")
            hints = section_fields(key)
            changes = {}
            for k, v in value.items():
                if k not in hints:
                    raise ApolloError(f"unknown config key {key}.{k}{_suggest(str(k), hints)}")
                changes[k] = _coerce(v, hints[k], f"{key}.{k}")
            top[key] = dataclasses.replace(getattr(cfg, key), **changes)
        elif key in ("out", "preset"):
            top[key] = str(value)
        else:
            raise ApolloError(f"unknown config key {key!r}{_suggest(str(key), (*SECTIONS, 'out', 'preset'))}")
    return dataclasses.replace(cfg, **top)


# Fields that do not change what a run computes: resuming may change them freely (threads can change the
# last bits of CPU matmuls, so exact resume equality is for an unchanged thread count).
NON_RESULT = ("out", "preset", "train.threads", "train.progress", "train.checkpoint_every", "train.keep_checkpoints",
              "train.skip_nonfinite", "train.check_ranks", "train.report_to", "train.energy", "train.country_iso_code",
              "train.energy_tracking_mode")


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """``section.field: old -> new`` for every field that changes the result of a run."""
    a, b = to_dict(old), to_dict(new)
    changes = []
    for key in a:
        for name in (a[key] if isinstance(a[key], dict) else {"": None}):
            dotted = f"{key}.{name}" if name else key
            va, vb = (a[key][name], b[key][name]) if name else (a[key], b[key])
            if va != vb and dotted not in NON_RESULT:
                changes.append(f"{dotted}: {va!r} -> {vb!r}")
    return changes


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def to_dict(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    for section in SECTIONS:
        d[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in d[section].items()}
    return d


def load_yaml(path: str | Path) -> RunConfig:
    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ApolloError(f"cannot read config {path}: {e.__class__.__name__}") from None
    if not isinstance(d, dict):
        raise ApolloError(f"config {path} must be a mapping")
    return from_dict(d)


def save_yaml(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def check(cfg: RunConfig) -> None:
    """Reject values no run can use, before anything is loaded or written."""
    m, t, d = cfg.model, cfg.train, cfg.data
    if m.arch not in ARCHS and not m.model_config:
        raise ApolloError(f"unknown --arch {m.arch!r} (choose from {', '.join(ARCHS)})")
    positive = {"layers": m.layers, "hidden": m.hidden, "heads": m.heads, "ffn": m.ffn, "vocab": m.vocab,
                "seq_len": m.seq_len, "batch_size": t.batch_size, "grad_accum": t.grad_accum, "lr": t.lr}
    for name, value in positive.items():
        if value <= 0:
            raise ApolloError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("steps", "tokens", "epochs", "eval_every", "eval_blocks", "threads", "clip", "weight_decay",
                 "checkpoint_every", "keep_checkpoints", "skip_nonfinite", "global_batch"):
        if getattr(t, name) < 0:
            raise ApolloError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(t, name)}")
    if not (t.steps or t.tokens or t.epochs):
        raise ApolloError("set the run length with --steps, --tokens or --epochs")
    if t.precision not in PRECISIONS:
        raise ApolloError(f"unknown precision {t.precision!r} (choose from {', '.join(PRECISIONS)})")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ApolloError(f"unknown device {t.device!r} (choose from auto, cpu, cuda)")
    if m.hidden % m.heads:
        raise ApolloError(f"--hidden {m.hidden} must be divisible by --heads {m.heads}")
    if m.seq_len < 4:
        raise ApolloError(f"--seq-len must be >= 4, got {m.seq_len}")
    if not 0 <= m.dropout < 1:
        raise ApolloError(f"--dropout must be in [0, 1), got {m.dropout}")
    if not 0 <= t.warmup < 1 or not 0 <= t.min_lr_ratio <= 1:
        raise ApolloError("--warmup must be in [0, 1) and --min-lr-ratio in [0, 1]")
    if t.lr_schedule not in LR_SCHEDULES:
        raise ApolloError(f"unknown --lr-schedule {t.lr_schedule!r} (choose from {', '.join(LR_SCHEDULES)})")
    if t.decay_shape not in DECAY_SHAPES:
        raise ApolloError(f"unknown --decay-shape {t.decay_shape!r} (choose from {', '.join(DECAY_SHAPES)})")
    if not 0 < t.decay_fraction <= 1 - t.warmup:
        raise ApolloError(f"--decay-fraction must be in (0, 1 - warmup], got {t.decay_fraction}")
    if not 0 < d.valid_fraction < 1:
        raise ApolloError(f"--valid-fraction must be in (0, 1), got {d.valid_fraction}")
    if not 0 < d.mlm_probability < 1:
        raise ApolloError(f"--mlm-probability must be in (0, 1), got {d.mlm_probability}")
    from .measure import energy  # a missing tracker or energy library is one line, before anything is written
    from .runtime import trackers

    trackers.check(t)
    energy.check(t)
