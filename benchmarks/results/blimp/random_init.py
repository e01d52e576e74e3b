"""Untrained (random-init, seed 0) `gpt-tiny` and `bert-tiny` models with tokenizers trained on WikiText-2 train:
the BLiMP floor. Usage: python benchmarks/results/blimp/random_init.py PATH/wiki.train.tokens.repack OUT_DIR"""

import sys
from pathlib import Path

from apollo.config import preset
from apollo.data import read_text_files, train_tokenizer
from apollo.models import build_model

train, out = sys.argv[1], Path(sys.argv[2])
texts = read_text_files([train])
for name in ("gpt-tiny", "bert-tiny"):
    m = preset(name).model
    model, tok = build_model(m, m.layers, seed=0), train_tokenizer(texts, m.arch, m.vocab)
    model.save_pretrained(out / name / "model")
    tok.save_pretrained(out / name / "model")
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(tok)} tokens -> "
          f"{out / name}")
