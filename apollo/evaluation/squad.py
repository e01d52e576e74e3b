"""SQuAD-style extractive QA: reading SQuAD JSON, HF's standard feature pre/post-processing, and EM/F1.

Pre/post-processing follows the Hugging Face question-answering example (offset mapping, overflowing windows
with a stride, n-best spans up to a maximum answer length, the null score for SQuAD 2.0). EM/F1 follow the
official SQuAD evaluation script; no maintained library computes them offline, so they are written here once.
"""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import numpy as np

from ..config import ApolloError

SQUAD_TASKS = ("squad", "squad_v2")
_PUNCTUATION = frozenset(string.punctuation)


def read_squad_json(path: Path) -> list[dict]:
    """A SQuAD v1.1 / v2.0 file -> rows {id, question, context, answers: {text, answer_start}} (the hub's schema)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        return [{"id": qa["id"], "question": qa["question"], "context": p["context"],
                 "answers": {"text": [a["text"] for a in qa["answers"]],
                             "answer_start": [a["answer_start"] for a in qa["answers"]]}}
                for article in data for p in article["paragraphs"] for qa in p["qas"]]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApolloError(f"{path} is not a SQuAD JSON file ({e.__class__.__name__})") from None
    except (KeyError, TypeError) as e:
        raise ApolloError(f"{path} is not a SQuAD JSON file (missing {e})") from None


def squad_splits(task: str, data_dir: Path | None) -> dict[str, list[dict]]:
    """train / dev from ``data_dir`` (train*.json, dev*.json) or from ``datasets`` (needs internet)."""
    if data_dir is None:
        from datasets import load_dataset

        try:
            ds = load_dataset(f"rajpurkar/{task}")
        except Exception as e:
            raise ApolloError(f"cannot load {task} with datasets ({e.__class__.__name__}); "
                              f"use --data-dir with SQuAD JSON files") from None
        return {"train": list(ds["train"]), "dev": list(ds["validation"])}
    splits = {}
    for split in ("train", "dev"):
        found = sorted(data_dir.glob(f"{split}*.json"))
        if not found:
            raise ApolloError(f"{task}: missing {split} split ({data_dir}/{split}*.json)")
        splits[split] = read_squad_json(found[0])
    return splits


def _tokenize(tokenizer, questions: list[str], contexts: list[str], max_length: int, stride: int):
    # Causal LMs have no [SEP]: the eos token ends the question so the model can tell it from the context.
    if tokenizer.sep_token is None:
        questions = [q + tokenizer.eos_token for q in questions]
    return tokenizer([q.lstrip() for q in questions], contexts, truncation="only_second", max_length=max_length,
                     stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)


def train_features(rows: list[dict], tokenizer, max_length: int, stride: int) -> list[dict]:
    """One feature per window; start/end token positions of the first answer, or 0 (the null span) when the
    answer is not inside the window or there is none."""
    enc = _tokenize(tokenizer, [r["question"] for r in rows], [r["context"] for r in rows], max_length, stride)
    out = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        row = rows[enc["overflow_to_sample_mapping"][i]]
        seq = enc.sequence_ids(i)
        start = end = 0
        if row["answers"]["answer_start"]:
            lo = row["answers"]["answer_start"][0]
            hi = lo + len(row["answers"]["text"][0])
            ctx = [j for j, s in enumerate(seq) if s == 1]
            if ctx and offsets[ctx[0]][0] <= lo and offsets[ctx[-1]][1] >= hi:
                start = next(j for j in ctx if offsets[j][1] > lo)
                end = next(j for j in reversed(ctx) if offsets[j][0] < hi)
        feature = {k: enc[k][i] for k in enc if k not in ("offset_mapping", "overflow_to_sample_mapping")}
        out.append(feature | {"start_positions": start, "end_positions": end})
    return out


def eval_features(rows: list[dict], tokenizer, max_length: int, stride: int) -> tuple[list[dict], list[dict]]:
    """Model inputs per window, and per window its example index and context offsets (None outside the context)."""
    enc = _tokenize(tokenizer, [r["question"] for r in rows], [r["context"] for r in rows], max_length, stride)
    inputs, meta = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        inputs.append({k: enc[k][i] for k in enc if k not in ("offset_mapping", "overflow_to_sample_mapping")})
        meta.append({"example": enc["overflow_to_sample_mapping"][i],
                     "offsets": [o if s == 1 else None for o, s in zip(offsets, seq, strict=True)]})
    return inputs, meta


def postprocess(rows: list[dict], meta: list[dict], start_logits: list[np.ndarray], end_logits: list[np.ndarray],
                n_best: int = 20, max_answer_length: int = 30, allow_null: bool = False) -> dict[str, str]:
    """Best answer text per example id. With ``allow_null`` (SQuAD 2.0) the answer is "" when the null span
    (position 0) scores higher than the best span, as in HF's example with a null threshold of 0."""
    by_example = collections.defaultdict(list)
    for i, m in enumerate(meta):
        by_example[m["example"]].append(i)
    answers = {}
    for e, row in enumerate(rows):
        best_text, best_score, null_score = "", -np.inf, np.inf
        for i in by_example[e]:
            s, t, offsets = start_logits[i], end_logits[i], meta[i]["offsets"]
            null_score = min(null_score, float(s[0] + t[0]))
            for a in np.argsort(s)[::-1][:n_best]:
                for b in np.argsort(t)[::-1][:n_best]:
                    if (a >= len(offsets) or b >= len(offsets) or offsets[a] is None or offsets[b] is None
                            or b < a or b - a + 1 > max_answer_length):
                        continue
                    score = float(s[a] + t[b])
                    if score > best_score:
                        best_score, best_text = score, row["context"][offsets[a][0] : offsets[b][1]]
        answers[row["id"]] = "" if allow_null and null_score > best_score else best_text
    return answers


def _normalize(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (the official script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(prediction: str, gold: str) -> float:
    p, g = _normalize(prediction).split(), _normalize(gold).split()
    if not p or not g:  # no-answer: right only if both are empty
        return float(p == g)
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(rows: list[dict], predictions: dict[str, str]) -> dict[str, float]:
    """Exact match and token F1 x100, each the max over an example's gold answers ("" when it has none)."""
    em = f1 = 0.0
    for row in rows:
        golds = [a for a in row["answers"]["text"] if _normalize(a)] or [""]
        pred = predictions.get(row["id"], "")
        em += max(float(_normalize(pred) == _normalize(g)) for g in golds)
        f1 += max(_f1(pred, g) for g in golds)
    n = max(1, len(rows))
    return {"f1": 100 * f1 / n, "exact_match": 100 * em / n}
