"""Table 4 on our checkpoints: fine-tune the runs of one real-data benchmark point on GLUE tasks.

Evaluates every method's final model in a `wikitext.py` result folder (plus a randomly initialised model of the
same shape, the "no pretraining" floor) with `apollo evaluate`, and writes the table to --out. Finished fine-tunes
are kept, so several processes can split the methods (--methods) and a last call without work merges them.

    python benchmarks/downstream.py --point benchmarks/results/plus/bert-h64-1500000-s0 \
        --data-dir ../shared/data/glue --out benchmarks/results/glue/bert-h64-1500000-s0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from apollo.config import ApolloError
from apollo.evaluation.finetune import FinetuneConfig, evaluate_runs, model_dir

METHODS = ("scratch", "stackbert", "apollo", "apollo-plus", "bert2bert", "ligo", "random-init")


def random_init(like: Path, out: Path) -> Path:
    """A model of ``like``'s shape with fresh weights (seed 0) and its tokenizer: the no-pretraining floor."""
    if not (out / "model" / "config.json").is_file():
        config = AutoConfig.from_pretrained(like)
        auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
        torch.manual_seed(0)
        auto.from_config(config).save_pretrained(out / "model")
        AutoTokenizer.from_pretrained(like).save_pretrained(out / "model")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--point", required=True, help="a wikitext.py result folder holding one run per method")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--data-dir", required=True, help="GLUE root (SST-2/, MRPC/, RTE/, STS-B/ ...)")
    p.add_argument("--tasks", default="sst2,mrpc,rte,stsb")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-train", type=int, default=1500)
    p.add_argument("--max-dev", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lm-test", nargs="*", default=(), help="text files for each run's LM perplexity")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    point, out = Path(a.point), Path(a.out)
    runs = []
    for name in a.methods.split(","):
        if name == "random-init":
            runs.append(random_init(model_dir(point / "scratch"), out / "random-init"))
        elif (point / name / "model").is_dir():
            runs.append(point / name)
        else:
            print(f"skipping {name}: no {point / name / 'model'}", file=sys.stderr)
    cfg = FinetuneConfig("", data_dir=a.data_dir, epochs=a.epochs, max_train=a.max_train, max_dev=a.max_dev,
                         threads=a.threads)
    try:
        table = evaluate_runs(runs, a.tasks.split(","), [int(s) for s in a.seeds.split(",")], cfg, out,
                              list(a.lm_test))
    except ApolloError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
