"""Downstream evaluation (the paper's Table 4): fine-tune a pretrained run on GLUE / SQuAD with HF task heads.

``finetune`` trains one (run, task, seed): the run's saved model under ``AutoModelForSequenceClassification`` or
``AutoModelForQuestionAnswering``, AdamW with linear warm-up and decay, the dev split scored every epoch, early
stopping on its headline metric, and the test split scored once with the best dev weights. Tasks whose test
labels are hidden (SST-2, WNLI, SQuAD) are scored on their official dev split, and a dev split of ``dev_size``
examples is held out of train for early stopping instead, so no reported number was used for model selection.
``evaluate_runs`` repeats that for every run x task x seed and writes the table; its task ``blimp`` is zero-shot
(``apollo.evaluation.blimp``: no fine-tuning, one score per run).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

from ..config import ApolloError, load_yaml
from ..models import is_masked, max_tokens
from . import squad
from .glue import GLUE_TASKS, Example, glue_metrics, hub_splits, tsv_splits

TASKS = (*GLUE_TASKS, *squad.SQUAD_TASKS)
BLIMP = "blimp"  # zero-shot, in evaluate only (apollo.evaluation.blimp)
HEADLINE = {**{name: t.metrics[0] for name, t in GLUE_TASKS.items()}, "squad": "f1", "squad_v2": "f1",
            BLIMP: "accuracy"}


@dataclass(frozen=True)
class FinetuneConfig:
    task: str
    data_dir: str = ""  # GLUE-format TSVs (a GLUE root or the task's folder) / SQuAD JSON; "" = `datasets`
    seed: int = 0
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3  # far above BERT-base's 2e-5: at 1e-4 a hidden-64 BERT stayed at SST-2's majority class
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    dropout: float = 0.1
    max_length: int = 128  # capped by the model's position table
    max_train: int = 0  # use at most this many training examples (a fixed sample, the same for every seed); 0 = all
    dev_size: int = 1000  # examples held out of train when the official dev split becomes the test split
    max_dev: int = 0  # score at most this many dev examples each epoch (a fixed sample); 0 = all
    patience: int = 2  # stop after this many dev evaluations without improvement; 0 = never
    doc_stride: int = 64  # SQuAD: overlap of consecutive context windows
    max_answer_length: int = 30
    threads: int = 0  # torch intra-op threads; 0 = torch's default


def model_dir(run: Path) -> Path:
    """A run directory (holding ``model/``) or a saved HF model directory."""
    for d in (run / "model", run):
        if (d / "config.json").is_file():
            return d
    raise ApolloError(f"{run} holds no saved model (no config.json in {run / 'model'} or {run})")


def task_splits(cfg: FinetuneConfig) -> tuple[dict[str, list], str]:
    """train / dev / test for the task, and a note on where each came from."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise ApolloError(f"--data-dir {data_dir} is not a directory")
    if cfg.task in squad.SQUAD_TASKS:
        splits = squad.squad_splits(cfg.task, data_dir)
    else:
        splits = tsv_splits(GLUE_TASKS[cfg.task], data_dir) if data_dir else hub_splits(GLUE_TASKS[cfg.task])
    note = "test = the test split"
    if "test" not in splits:  # hidden test labels: report on dev, select on a slice of train
        order = list(range(len(splits["train"])))
        random.Random(0).shuffle(order)  # fixed: every seed and run sees the same split
        n_dev = min(cfg.dev_size, len(order) // 5)
        if n_dev < 1:
            raise ApolloError(f"{cfg.task}: train split too small ({len(order)}) to hold out a dev split")
        splits = {"train": [splits["train"][i] for i in sorted(order[n_dev:])],
                  "dev": [splits["train"][i] for i in sorted(order[:n_dev])], "test": splits["dev"]}
        note = f"test = the dev split (test labels hidden); dev = {n_dev} examples held out of train"
    if cfg.max_train and len(splits["train"]) > cfg.max_train:
        keep = sorted(random.Random(1).sample(range(len(splits["train"])), cfg.max_train))
        splits["train"] = [splits["train"][i] for i in keep]
        note += f"; train = fixed sample of {cfg.max_train}"
    if cfg.max_dev and len(splits["dev"]) > cfg.max_dev:
        keep = sorted(random.Random(2).sample(range(len(splits["dev"])), cfg.max_dev))
        splits["dev"] = [splits["dev"][i] for i in keep]
        note += f"; dev = fixed sample of {cfg.max_dev}"
    return splits, note


def _load(cfg: FinetuneConfig, path: Path):
    """Tokenizer and the task model on the run's weights (new head initialised from the seed)."""
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ApolloError(f"cannot load the tokenizer in {path}: {(str(e).splitlines() or [''])[0][:200]}") from None
    qa = cfg.task in squad.SQUAD_TASKS
    extra = {} if qa else {"num_labels": GLUE_TASKS[cfg.task].num_labels,
                          "problem_type": "regression" if not GLUE_TASKS[cfg.task].labels else
                          "single_label_classification"}
    config = AutoConfig.from_pretrained(path, **extra)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, cfg.dropout)
    if tok.pad_token is None:  # GPT-2: pad with eos; the classifier reads the last non-pad token
        tok.pad_token = tok.eos_token
    config.pad_token_id = tok.pad_token_id
    tok.model_max_length = min(cfg.max_length, _positions(config))
    torch.manual_seed(cfg.seed)
    auto = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    try:
        with _quiet():
            model = auto.from_pretrained(path, config=config)
    except (OSError, ValueError) as e:  # no weights, or an architecture without this task head
        raise ApolloError(f"cannot load {path} for {cfg.task}: {(str(e).splitlines() or [''])[0][:200]}") from None
    return tok, model


def _positions(config) -> int:
    """The longest input the model's position table takes (``models.max_tokens``)."""
    return max_tokens(config)


@contextlib.contextmanager
def _quiet():
    """Silence HF's load report (the new task head is expected to be missing) and its progress bar."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _encode_glue(tok, rows: list[Example], max_length: int) -> list[dict]:
    a = [r.text_a for r in rows]
    b = None if rows[0].text_b is None else [r.text_b for r in rows]
    if b is not None and tok.sep_token is None:  # causal LMs: eos separates the two texts
        b = [tok.eos_token + x for x in b]
    enc = tok(a, b, truncation=True, max_length=max_length)
    return [{k: enc[k][i] for k in enc} | {"labels": r.label} for i, r in enumerate(rows)]


def _batches(features: list[dict], collate, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(features), generator=generator).tolist() if generator else list(range(len(features)))
    for s in range(0, len(order), batch_size):
        yield collate([features[i] for i in order[s : s + batch_size]])


@torch.no_grad()
def _predict(model, features: list[dict], collate, batch_size: int, keys: tuple[str, ...]) -> list[np.ndarray]:
    """Outputs ``keys`` (logits, or start/end logits) per feature, unpadded."""
    model.eval()
    out: dict[str, list] = {k: [] for k in keys}
    for batch in _batches(features, collate, batch_size, None):
        batch = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
        result = model(**batch)
        lengths = batch["attention_mask"].sum(1).tolist()
        for k in keys:
            values = getattr(result, k).float().numpy()
            out[k].extend(v if k == "logits" else v[:n] for v, n in zip(values, lengths, strict=True))
    model.train()
    return [out[k] for k in keys]


def _scorer(cfg: FinetuneConfig, tok, splits: dict):
    """Per split: features for the model, and a function (model) -> metrics."""
    collate = DataCollatorWithPadding(tok)
    bs = cfg.batch_size * 2
    if cfg.task in squad.SQUAD_TASKS:
        allow_null = cfg.task == "squad_v2"

        def make(rows):
            features, meta = squad.eval_features(rows, tok, tok.model_max_length, cfg.doc_stride)

            def score(model):
                starts, ends = _predict(model, features, collate, bs, ("start_logits", "end_logits"))
                answers = squad.postprocess(rows, meta, starts, ends, max_answer_length=cfg.max_answer_length,
                                            allow_null=allow_null)
                return squad.squad_metrics(rows, answers)
            return score

        train = squad.train_features(splits["train"], tok, tok.model_max_length, cfg.doc_stride)
    else:
        task = GLUE_TASKS[cfg.task]

        def make(rows):
            features = _encode_glue(tok, rows, tok.model_max_length)
            labels = np.array([r.label for r in rows])

            def score(model):
                (logits,) = _predict(model, features, collate, bs, ("logits",))
                logits = np.stack(logits)
                predictions = logits[:, 0] if not task.labels else logits.argmax(-1)
                return glue_metrics(task, predictions, labels)
            return score

        train = _encode_glue(tok, splits["train"], tok.model_max_length)
    return train, collate, make(splits["dev"]), make(splits["test"])


def finetune(run: Path, cfg: FinetuneConfig, out: Path | None = None, log=print) -> dict:
    """Fine-tune ``run``'s model on ``cfg.task``; returns (and writes to ``out/result.json``) the metrics."""
    if cfg.task not in TASKS:
        hint = "; blimp is zero-shot: apollo evaluate --tasks blimp" if cfg.task == BLIMP else ""
        raise ApolloError(f"unknown task {cfg.task!r} (choose from {', '.join(TASKS)}{hint})")
    for name in ("epochs", "batch_size", "max_length"):
        if getattr(cfg, name) < 1:
            raise ApolloError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ApolloError(f"lr must be > 0, got {cfg.lr}")
    path = model_dir(Path(run))
    splits, note = task_splits(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok, model = _load(cfg, path)
    if cfg.task in squad.SQUAD_TASKS and not 0 <= cfg.doc_stride < tok.model_max_length // 2:
        raise ApolloError(f"doc_stride must be in [0, max_length / 2), got {cfg.doc_stride} with a max length of "
                          f"{tok.model_max_length} (the model's positions cap --max-length)")
    train, collate, score_dev, score_test = _scorer(cfg, tok, splits)
    headline = HEADLINE[cfg.task]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup * total), total)
    generator = torch.Generator().manual_seed(cfg.seed)
    best_dev, best_epoch, best_state, history, bad = None, 0, None, [], 0
    start = time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        for batch in _batches(train, collate, cfg.batch_size, generator):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        dev = score_dev(model)
        history.append({"epoch": epoch, "loss": loss.item(), **{f"dev_{k}": v for k, v in dev.items()}})
        log(f"[{cfg.task} seed {cfg.seed}] epoch {epoch}: dev {headline} {dev[headline]:.2f}")
        if best_dev is None or dev[headline] > best_dev[headline]:
            best_dev, best_epoch, bad = dev, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if cfg.patience and bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    test = score_test(model)
    result = {"run": str(run), "task": cfg.task, "seed": cfg.seed, "metric": headline, "dev": best_dev,
              "test": test, "epochs_run": len(history), "best_epoch": best_epoch,
              "train_examples": len(splits["train"]), "dev_examples": len(splits["dev"]),
              "test_examples": len(splits["test"]), "splits": note, "wall_s": time.perf_counter() - start,
              "history": history, "config": asdict(cfg)}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


# ---- Table 4: every run x task x seed ----------------------------------------------------------------------------


def run_label(run: Path) -> str:
    """The run's method (from its config.yaml), else its directory name."""
    try:
        return load_yaml(run / "config.yaml").method.method
    except (ApolloError, OSError):
        return run.name


@torch.no_grad()
def lm_perplexity(run: Path, files: list[str]) -> float:
    """exp(mean token loss) of the run's model on text files, packed into its own blocks; for BERT the loss is
    over a fixed seeded 15% mask (an MLM perplexity, comparable only between BERT runs)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from ..data import pack_blocks, read_text_files, valid_batches
    from ..models import get_layers
    from ..runtime.train import evaluate

    path = model_dir(run)
    config = AutoConfig.from_pretrained(path)
    mlm = is_masked(config.model_type)
    with _quiet():
        model = (AutoModelForMaskedLM if mlm else AutoModelForCausalLM).from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = int(1e30)
    blocks = pack_blocks(read_text_files(files), tok, _positions(config), config.model_type)
    batches = valid_batches(blocks, 16, tok, mlm, 0.15, seed=0, max_blocks=0)
    return math.exp(evaluate(model, batches, list(range(len(get_layers(model)))), mlm))


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def write_table(results: list[dict], tasks: list[str], out: Path, ppl: dict[str, float] | None = None) -> str:
    """Markdown (mean ± std over seeds of each task's headline test metric, and their average over the fine-tuned
    tasks; BLiMP's zero-shot accuracy is a column outside the average) and a long CSV."""
    out.mkdir(parents=True, exist_ok=True)
    labels = list(dict.fromkeys(r["label"] for r in results))
    tuned = [t for t in tasks if t != BLIMP]
    head = [f"{t} ({HEADLINE[t]})" for t in tasks] + (["average"] if tuned else [])
    lines = ["| method | " + " | ".join(head) + " |" + (" LM perplexity |" if ppl else ""),
             "|---" * (len(head) + 1 + bool(ppl)) + "|"]
    for label in labels:
        cells, means = [], []
        for t in tasks:
            values = [r["test"][r["metric"]] for r in results if r["label"] == label and r["task"] == t]
            cells.append(_mean_std(values) if values else "–")
            means += [float(np.mean(values))] if values and t != BLIMP else []
        if tuned:
            cells.append(f"{np.mean(means):.1f}" if len(means) == len(tuned) else "–")
        extra = f" {ppl[label]:.1f} |" if ppl else ""
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + extra)
    table = "\n".join(lines)
    seeds = sorted({r["seed"] for r in results if r["task"] != BLIMP})
    splits = {r["task"]: r["splits"] for r in results}
    notes = [f"Test-split metrics x100, mean ± std over seeds {', '.join(map(str, seeds))}; "
             f"each run fine-tuned with the same hyper-parameters and seeds; early stopping on dev."] if tuned else []
    notes += [f"- {t}: {splits[t]}" for t in tasks if t in splits]
    (out / "results.md").write_text(table + "\n\n" + "\n".join(notes) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "run", "task", "seed", "split", "metric", "value"])
        for r in results:
            for split in ("dev", "test"):
                writer.writerows([r["label"], r["run"], r["task"], r["seed"], split, k, round(v, 4)]
                                 for k, v in r[split].items())
    return table


def _same_settings(saved: dict | None, wanted: dict) -> bool:
    """Equal configs, ignoring the thread count (it changes only the order of float sums, not the experiment)."""
    return saved is not None and {k: v for k, v in saved.items() if k != "threads"} == \
        {k: v for k, v in wanted.items() if k != "threads"}


def result_dir(out: Path, label: str) -> Path:
    """Where a run's results live in an evaluation folder: one sub-folder per label."""
    return out / label.replace(" ", "_").replace("(", "").replace(")", "")


def _made_by(out: Path, label: str) -> set[Path]:
    """The runs whose results ``out`` keeps under ``label``."""
    paths = (json.loads(p.read_text()).get("run") for p in result_dir(out, label).glob("*/result.json"))
    return {Path(p).resolve() for p in paths if p}


def run_labels(runs: list[Path], out: Path) -> dict[Path, str]:
    """Each run's label: its method, or ``method (dir name)`` when another run here or in ``out`` uses the method.
    A run needs its saved model unless ``out`` already keeps results of it (their model may since be deleted)."""
    labels: dict[Path, str] = {}
    for run in runs:
        label, me = run_label(run), run.resolve()
        makers = _made_by(out, label)
        if label in labels.values() or makers - {me}:
            label = f"{label} ({run.name})"
            makers = _made_by(out, label)
            if label in labels.values() or makers - {me}:
                raise ApolloError(f"{run}: its label {label!r} is taken by another run (here or in {out}); "
                                  "pass distinct run directories or another --out")
        if me not in makers:
            model_dir(run)  # fail before any training
        labels[run] = label
    return labels


def evaluate_runs(runs: list[Path], tasks: list[str], seeds: list[int], cfg: FinetuneConfig, out: Path,
                  lm_test: list[str] = (), log=print, blimp_dir: str = "", max_pairs: int = 0) -> str:
    """Fine-tune every run on every task with every seed and write the table. Finished fine-tunes in ``out`` with
    the same settings (any thread count) are kept, so an interrupted evaluation resumes. Task ``blimp`` scores each
    run zero-shot on the BLiMP files in ``blimp_dir`` (``max_pairs`` per paradigm; apollo.evaluation.blimp) and
    also writes ``blimp.md`` / ``blimp.csv``."""
    unknown = [t for t in tasks if t not in (*TASKS, BLIMP)]
    if unknown:
        raise ApolloError(f"unknown task {unknown[0]!r} (choose from {', '.join((*TASKS, BLIMP))})")
    if not runs or not tasks or not seeds:
        raise ApolloError("evaluate needs at least one run, one task and one seed")
    labels = run_labels(runs, out)
    if BLIMP in tasks:
        from . import blimp

        paradigms = blimp.load(blimp_dir, max_pairs)  # fail before any training
        ref = blimp.reference(blimp_dir, paradigms)
    results = []
    for run, label in labels.items():
        for task in (t for t in tasks if t != BLIMP):
            for seed in seeds:
                where = result_dir(out, label) / f"{task}-s{seed}"
                ft = FinetuneConfig(**{**asdict(cfg), "task": task, "seed": seed})
                saved = json.loads((where / "result.json").read_text()) if (where / "result.json").is_file() else {}
                if _same_settings(saved.get("config"), asdict(ft)):
                    result = saved
                else:  # not run yet, or run with other settings: (re)train
                    log(f"fine-tuning {label} on {task}, seed {seed}")
                    result = finetune(run, ft, where, log=log)
                results.append(result | {"label": label})
    if BLIMP in tasks:
        zero_shot = blimp.evaluate(labels, paradigms, out, ref, cfg.threads, log)
        blimp.write_tables(zero_shot, paradigms, ref, out)
        results += zero_shot
    ppl = {label: lm_perplexity(run, list(lm_test)) for run, label in labels.items()} if lm_test else None
    return write_table(results, tasks, out, ppl)
