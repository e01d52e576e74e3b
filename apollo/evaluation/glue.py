"""GLUE tasks: the task table, GLUE-format TSV reading (header / no header / BOM), the hub route, and metrics.

A split is a list of ``Example``; labels are class ids (in the hub's order, so both routes agree) or a float for
STS-B. Metrics come from scikit-learn and SciPy and are reported x100, as in the GLUE papers.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ..config import ApolloError


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float | int | None  # None: an unlabelled split (e.g. GLUE's test files)


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str  # the task's directory in a GLUE download (glue_data/<folder>)
    columns: tuple[str, str | None, str]  # header names of text a, text b, label
    positions: tuple[int, int | None, int]  # the same columns in a headerless file
    labels: tuple[str, ...]  # label strings in class-id order; () = regression
    metrics: tuple[str, ...]  # the first is the task's headline metric
    hub_columns: tuple[str, str | None]  # text columns of the `datasets` glue/<name> config
    dev: str = "dev"  # file stem / hub split suffix of the dev split
    test: str = "test"

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


_NLI = ("entailment", "not_entailment")
GLUE_TASKS = {t.name: t for t in (
    GlueTask("cola", "CoLA", ("sentence", None, "label"), (3, None, 1), ("0", "1"), ("mcc", "accuracy"),
             ("sentence", None)),
    GlueTask("sst2", "SST-2", ("sentence", None, "label"), (0, None, 1), ("0", "1"), ("accuracy",),
             ("sentence", None)),
    GlueTask("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), (3, 4, 0), ("0", "1"), ("f1", "accuracy"),
             ("sentence1", "sentence2")),
    GlueTask("qqp", "QQP", ("question1", "question2", "is_duplicate"), (3, 4, 5), ("0", "1"), ("f1", "accuracy"),
             ("question1", "question2")),
    GlueTask("stsb", "STS-B", ("sentence1", "sentence2", "score"), (7, 8, -1), (), ("spearman", "pearson"),
             ("sentence1", "sentence2")),
    GlueTask("mnli", "MNLI", ("sentence1", "sentence2", "gold_label"), (8, 9, -1),
             ("entailment", "neutral", "contradiction"), ("accuracy",), ("premise", "hypothesis"),
             dev="dev_matched", test="test_matched"),
    GlueTask("qnli", "QNLI", ("question", "sentence", "label"), (1, 2, 3), _NLI, ("accuracy",),
             ("question", "sentence")),
    GlueTask("rte", "RTE", ("sentence1", "sentence2", "label"), (1, 2, 3), _NLI, ("accuracy",),
             ("sentence1", "sentence2")),
    GlueTask("wnli", "WNLI", ("sentence1", "sentence2", "label"), (1, 2, 3), ("0", "1"), ("accuracy",),
             ("sentence1", "sentence2")),
)}


def _parse_label(task: GlueTask, value: str, where: str) -> float | int:
    value = value.strip()
    if not task.labels:
        try:
            return float(value)
        except ValueError:
            raise ApolloError(f"{where}: score {value!r} is not a number") from None
    if value in task.labels:
        return task.labels.index(value)
    raise ApolloError(f"{where}: label {value!r} is not one of {', '.join(task.labels)}")


def read_tsv(path: Path, task: GlueTask) -> list[Example]:
    """One GLUE-format file. A first row naming the task's columns is a header (a UTF-8 BOM is ignored); files
    without one are read by position. A header without the label column marks an unlabelled file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    except UnicodeDecodeError:
        raise ApolloError(f"{path} is not UTF-8 text") from None
    if not rows:
        raise ApolloError(f"{path} is empty")
    a, b, y = task.positions
    start = 1
    if any(name in rows[0] for name in task.columns if name):
        header, rows, start = rows[0], rows[1:], 2
        missing = [n for n in task.columns[:2] if n and n not in header]
        if missing:
            raise ApolloError(f"{path}: header lacks the {task.name} column(s) {', '.join(missing)}")
        a = header.index(task.columns[0])
        b = header.index(task.columns[1]) if task.columns[1] else None
        y = header.index(task.columns[2]) if task.columns[2] in header else None
    need = max(i + 1 if i >= 0 else -i for i in (a, b, y) if i is not None)
    out, short = [], 0
    for line, row in enumerate(rows, start=start):
        if len(row) < need:  # GLUE's QQP/MNLI files hold a few broken lines; HF's processors skip them too
            short += 1
            continue
        label = _parse_label(task, row[y], f"{path}:{line}") if y is not None else None
        out.append(Example(row[a], row[b] if b is not None else None, label))
    if short > max(10, len(rows) // 100):
        raise ApolloError(f"{path}: {short} of {len(rows)} rows have too few columns for {task.name}")
    if not out:
        raise ApolloError(f"{path} has a header but no examples")
    return out


def tsv_splits(task: GlueTask, data_dir: Path) -> dict[str, list[Example]]:
    """train / dev / test from ``data_dir`` (a task folder, or a GLUE root holding ``<folder>/``); test only when
    its file exists and is labelled."""
    folder = data_dir / task.folder if (data_dir / task.folder).is_dir() else data_dir
    splits = {}
    for split, stem in (("train", "train"), ("dev", task.dev), ("test", task.test)):
        path = folder / f"{stem}.tsv"
        if not path.is_file():
            if split == "test":
                continue
            raise ApolloError(f"{task.name}: missing {split} split {path}")
        rows = read_tsv(path, task)
        if rows[0].label is None:
            if split != "test":
                raise ApolloError(f"{task.name}: {path} has no labels")
            continue
        splits[split] = rows
    return splits


def hub_splits(task: GlueTask) -> dict[str, list[Example]]:
    """The same splits from ``datasets`` (glue/<task>; needs internet). Its test labels are hidden (-1): dropped."""
    from datasets import load_dataset

    try:
        ds = load_dataset("nyu-mll/glue", task.name)
    except Exception as e:  # offline, renamed, ...: one line, not a traceback
        raise ApolloError(f"cannot load glue/{task.name} with datasets ({e.__class__.__name__}); "
                          f"use --data-dir with GLUE-format TSV files") from None
    names = {"train": "train", "dev": "validation", "test": "test"}
    if task.dev != "dev":
        names |= {"dev": "validation_matched", "test": "test_matched"}
    return hub_to_splits(task, {split: ds[name] for split, name in names.items() if name in ds})


def hub_to_splits(task: GlueTask, ds: dict) -> dict[str, list[Example]]:
    """Rows of a `datasets` GLUE config -> Examples; splits whose labels are all hidden (-1) are dropped."""
    a, b = task.hub_columns
    out = {}
    for split, rows in ds.items():
        labels = rows["label"]
        if all(label == -1 for label in labels):
            continue
        out[split] = [Example(x, y, label if task.labels else float(label))
                      for x, y, label in zip(rows[a], rows[b] if b else [None] * len(labels), labels, strict=True)]
    for split in ("train", "dev"):
        if split not in out:
            raise ApolloError(f"{task.name}: the dataset has no labelled {split} split")
    return out


def glue_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics x100: class ids for classification, scores for STS-B."""
    found = {}
    for name in task.metrics:
        if name == "accuracy":
            found[name] = accuracy_score(labels, predictions)
        elif name == "f1":
            found[name] = f1_score(labels, predictions, zero_division=0.0)
        elif name == "mcc":
            found[name] = matthews_corrcoef(labels, predictions)
        elif name in ("pearson", "spearman"):
            with warnings.catch_warnings():  # SciPy warns (and returns NaN) on (near-)constant predictions
                warnings.simplefilter("ignore")
                r = (pearsonr if name == "pearson" else spearmanr)(predictions, labels).statistic
            found[name] = r if np.isfinite(r) else 0.0  # a constant prediction carries no correlation
    return {k: 100 * float(v) for k, v in found.items()}
