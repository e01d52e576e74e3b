"""A plain transformers.Trainer pretraining script; Apollo is the import and the `apollo=` argument.

    python examples/hf_trainer.py --data ../shared/data/wikitext-2/wiki.train.tokens.repack --out runs/hf-apollo
    torchrun --nproc_per_node 2 examples/hf_trainer.py --data FILE --out DIR      # data parallel, the same depths
"""

import argparse

from datasets import load_dataset
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from apollo import ApolloConfig, ApolloTrainer

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True, help="a plain-text training file")
ap.add_argument("--out", required=True)
ap.add_argument("--method", default="apollo", help="any method of apollo.method.table but bert2bert / ligo")
ap.add_argument("--steps", type=int, default=400)
ap.add_argument("--layers", type=int, default=12)
ap.add_argument("--hidden", type=int, default=128)
ap.add_argument("--seq-len", type=int, default=128)
ap.add_argument("--vocab", type=int, default=8192)
a = ap.parse_args()

bpe = ByteLevelBPETokenizer()
bpe.train([a.data], vocab_size=a.vocab, special_tokens=["<|endoftext|>"])
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def blocks(batch):  # concatenate, then cut into seq-len blocks (the usual causal-LM recipe)
    ids = [t for line in tokenizer(batch["text"])["input_ids"] for t in line]
    n = len(ids) // a.seq_len * a.seq_len
    return {"input_ids": [ids[i:i + a.seq_len] for i in range(0, n, a.seq_len)]}


text = load_dataset("text", data_files={"train": a.data})["train"]
train = text.map(blocks, batched=True, remove_columns=["text"])

config = AutoConfig.for_model("gpt2", n_layer=a.layers, n_embd=a.hidden, n_head=max(1, a.hidden // 32),
                              vocab_size=len(tokenizer), n_positions=a.seq_len)
model = AutoModelForCausalLM.from_config(config)
args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=16,
                         gradient_accumulation_steps=2, learning_rate=2e-3, lr_scheduler_type="cosine",
                         warmup_steps=0.025, weight_decay=0.01, logging_steps=10, save_steps=100,
                         report_to="none", use_cpu=True)
trainer = ApolloTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                        apollo=ApolloConfig(method=a.method))
trainer.train()
trainer.save_model(a.out + "/model")
print(f"trained {a.method}: {trainer.state.total_flos / 1e12:.3f} TFLOPs at the depths run, "
      f"final loss {trainer.state.log_history[-2]['loss']:.3f}")
