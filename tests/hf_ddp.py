"""Run by tests/test_hf_trainer.py under torchrun (2 gloo processes): ApolloTrainer with DDP; each rank writes its
depths, growths and a digest of its final weights to OUT/rank{R}.json."""

import hashlib
import json
import os
import sys
from pathlib import Path

from transformers import TrainingArguments, default_data_collator

from apollo import ApolloConfig, ApolloTrainer
from apollo.config import DataConfig, ModelConfig
from apollo.data import load_lm_data
from apollo.models import build_model

out = Path(sys.argv[1])
m = ModelConfig(arch="gpt2", layers=6, hidden=32, heads=2, ffn=64, vocab=512, seq_len=16, dropout=0.0)
data = load_lm_data(DataConfig(synthetic_sentences=1200), m, 0)
rows = [{"input_ids": b, "labels": b} for b in data.train]
args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                         max_steps=12, learning_rate=2e-3, report_to="none", use_cpu=True, ddp_backend="gloo",
                         save_strategy="no", disable_tqdm=True, seed=0)
trainer = ApolloTrainer(model=build_model(m, 6, 0), args=args, train_dataset=rows, data_collator=default_data_collator,
                        apollo=ApolloConfig("apollo", stages=(1, 3, 6), switch=(4, 8), switch_unit="step"))
trainer.train()
digest = hashlib.sha256(b"".join(v.detach().contiguous().numpy().tobytes()
                                 for _, v in sorted(trainer.model.state_dict().items()))).hexdigest()
grows = [[h["step"], h["apollo_grow"]["to"]] for h in trainer.state.log_history if "apollo_grow" in h]
rank = int(os.environ.get("RANK", 0))
(out / f"rank{rank}.json").write_text(json.dumps({"depths": trainer.depths, "grows": grows, "weights": digest,
                                                  "world": trainer.args.world_size}))
