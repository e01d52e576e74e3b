"""The sparse MLM loss is HF's loss, computed only where it is needed."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from apollo.models import lm_loss


def _bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg)


def _roberta():
    """RoBERTa's head is ``lm_head`` (dense, gelu, LayerNorm, decoder), per position like BERT's ``cls``."""
    from apollo.config import ModelConfig
    from apollo.models import build_model

    return build_model(ModelConfig("roberta", 2, 32, 2, 64, 97, 16, 0.0), 2, seed=0)


@pytest.mark.parametrize("make, positions, loss_tol", [(_bert, [1, 4, 9], 1e-6), (_roberta, [0, 4, 9, 15], 1e-5)],
                         ids=["bert", "roberta"])
def test_sparse_mlm_loss_and_grads_equal_hf(make, positions, loss_tol):
    model = make()
    ids = torch.randint(5, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, positions] = ids[:, positions]
    batch = {"input_ids": ids, "labels": labels}
    ours = lm_loss(model, batch, mlm=True)
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    hf = model(**batch).loss
    hf.backward()
    torch.testing.assert_close(ours, hf, rtol=loss_tol, atol=loss_tol)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours_grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_sparse_mlm_loss_without_masked_positions_is_zero_not_nan():
    model = _bert()
    ids = torch.randint(5, 97, (2, 16))
    loss = lm_loss(model, {"input_ids": ids, "labels": torch.full_like(ids, -100)}, mlm=True)
    assert loss.item() == 0.0


def test_causal_loss_is_hf_loss():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0,
                                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    ids = torch.randint(0, 97, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    assert lm_loss(model, batch, mlm=False).item() == model(**batch).loss.item()
