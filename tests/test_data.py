"""apollo.data: synthetic corpus, file/dataset readers, tokenizers, packing and deterministic batches."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoTokenizer

from apollo.config import ApolloError, DataConfig, ModelConfig
from apollo.data import (
    Batches,
    LMData,
    hf_texts,
    load_lm_data,
    pack_blocks,
    read_text_files,
    synthetic_corpus,
    train_tokenizer,
    valid_batches,
)

SEQ = 32
VOCAB = {"bert": 400, "gpt2": 400}


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return synthetic_corpus(3000, seed=0)


@pytest.fixture(scope="module")
def toks(corpus) -> dict:
    return {arch: train_tokenizer(corpus, arch, VOCAB[arch]) for arch in ("bert", "gpt2")}


@pytest.fixture(scope="module")
def blocks(corpus, toks) -> dict:
    return {arch: pack_blocks(corpus, toks[arch], SEQ, arch) for arch in toks}


# ---- synthetic corpus -------------------------------------------------------------------------------------------


def test_synthetic_corpus_is_deterministic():
    assert synthetic_corpus(500, seed=3) == synthetic_corpus(500, seed=3)
    assert synthetic_corpus(500, seed=3) != synthetic_corpus(500, seed=4)
    assert synthetic_corpus(0) == []


def test_synthetic_corpus_is_english_like(corpus):
    sentences = [s for p in corpus for s in re.findall(r"[^.]+\.", p)]
    assert len(sentences) == 3000  # exactly n_sentences, each ending in '.'
    assert all(p.endswith(".") for p in corpus)
    sizes = [len(re.findall(r"\.", p)) for p in corpus]
    assert all(3 <= k <= 8 for k in sizes[:-1]) and 1 <= sizes[-1] <= 8
    assert all(s.strip()[0].isupper() for s in sentences)
    words = [w.lower() for p in corpus for w in re.findall(r"[A-Za-z]+", p)]
    assert 300 <= len(set(words)) <= 1000  # a few hundred distinct words
    text = " ".join(corpus).lower()
    assert not re.search(r"\ba [aeiou]", text) and not re.search(r"\ban [^aeiou]", text)  # a/an agreement
    # Subject-verb agreement on the copula: plural determiners never take "is", singular ones never "are".
    assert not re.search(r"\b(these|those|several|many|two|three) \w+ is\b", text)
    assert not re.search(r"\b(this|every|one) \w+ are\b", text)


# ---- text sources -----------------------------------------------------------------------------------------------


def test_read_text_files_returns_non_blank_lines(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"first line\n\n   \nsecond line\r\n")
    b.write_text("caf\u00e9 third\n", encoding="utf-8")
    assert read_text_files([str(a), str(b)]) == ["first line", "second line", "caf\u00e9 third"]


@pytest.mark.parametrize(
    "kind, make",
    [
        ("missing", lambda p: None),
        ("directory", lambda p: p.mkdir()),
        ("binary", lambda p: p.write_bytes(b"text\x00more\n")),
        ("not-utf8", lambda p: p.write_bytes(b"caf\xe9 latin-1\n")),
        ("empty", lambda p: p.write_text("\n  \n\t\n", encoding="utf-8")),
    ],
)
def test_read_text_files_errors_name_the_file(tmp_path, kind, make):
    good = tmp_path / "good.txt"
    good.write_text("fine\n", encoding="utf-8")
    bad = tmp_path / f"{kind}.txt"
    make(bad)
    with pytest.raises(ApolloError) as err:
        read_text_files([str(good), str(bad)])
    msg = str(err.value)
    assert str(bad) in msg and "\n" not in msg


def test_hf_text_loader_matches_read_text_files(tmp_path):
    f = tmp_path / "lines.txt"
    f.write_text("one line here\n\nanother line\n  \nlast one\n", encoding="utf-8")
    got = hf_texts("text", data_files=[str(f)], cache_dir=str(tmp_path / "cache"))
    assert got == read_text_files([str(f)]) == ["one line here", "another line", "last one"]


def test_hf_texts_wraps_load_errors(tmp_path):
    with pytest.raises(ApolloError) as err:
        hf_texts("text", data_files=[str(tmp_path / "absent.txt")], cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value)


# ---- tokenizers and packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_tokenizer_round_trips_and_respects_vocab(tmp_path, corpus, toks, arch):
    tok = toks[arch]
    assert len(tok) <= VOCAB[arch]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sample = corpus[:20] + ["Unseen words: zebra, quantum! 42"]
    assert loaded(sample)["input_ids"] == tok(sample)["input_ids"]
    assert len(loaded) == len(tok) and loaded.all_special_tokens == tok.all_special_tokens
    if arch == "bert":
        assert (loaded.cls_token, loaded.sep_token, loaded.mask_token, loaded.pad_token, loaded.unk_token) == (
            "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")
        ids = tok("The dog sleeps.")["input_ids"]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.decode(ids, skip_special_tokens=True) == "the dog sleeps."
    else:
        assert loaded.eos_token == loaded.bos_token == "<|endoftext|>"
        assert tok.decode(tok(corpus[0])["input_ids"]) == corpus[0]  # byte-level BPE is lossless


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_tokenizer_training_is_deterministic(corpus, toks, arch):
    # WordPiece needs a workaround for huggingface/tokenizers#1794 (hash-map order); this would catch a regression.
    assert train_tokenizer(corpus, arch, VOCAB[arch]).get_vocab() == toks[arch].get_vocab()


def test_tokenizer_small_vocab_is_respected_or_refused(corpus):
    assert len(train_tokenizer(corpus, "bert", 100)) <= 100
    with pytest.raises(ApolloError):
        train_tokenizer(corpus, "gpt2", 200)  # byte-level needs 256 bytes + eos
    # any other model type: a masked LM's WordPiece if transformers has a masked-LM class for it, else byte-level
    assert train_tokenizer(corpus, "electra", 400).mask_token == "[MASK]"
    assert train_tokenizer(corpus, "phi3", 400).eos_token == "<|endoftext|>"


def test_bert_blocks_have_cls_and_sep(corpus, toks, blocks):
    tok, b = toks["bert"], blocks["bert"]
    assert b.dtype == torch.long and b.shape[1] == SEQ and len(b) > 50
    assert (b[:, 0] == tok.cls_token_id).all() and (b[:, -1] == tok.sep_token_id).all()
    # Texts are joined with [SEP] inside blocks: one per text, minus the dropped remainder.
    inner_seps = int((b[:, 1:-1] == tok.sep_token_id).sum())
    assert len(corpus) - 5 <= inner_seps <= len(corpus)
    n_tokens = sum(len(r) + 1 for r in tok(corpus, add_special_tokens=False)["input_ids"])
    assert len(b) == n_tokens // (SEQ - 2)


def test_gpt2_blocks_are_plain_tokens_with_eos_separators(corpus, toks, blocks):
    tok, b = toks["gpt2"], blocks["gpt2"]
    assert b.shape[1] == SEQ
    n_tokens = sum(len(r) + 1 for r in tok(corpus, add_special_tokens=False)["input_ids"])
    assert len(b) == n_tokens // SEQ
    assert len(corpus) - 5 <= int((b == tok.eos_token_id).sum()) <= len(corpus)
    assert tok.decode(b.flatten()[:200]).startswith(corpus[0] + "<|endoftext|>" + corpus[1][:20])


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_corpus_smaller_than_a_block_raises(toks, arch):
    with pytest.raises(ApolloError, match=r"corpus has \d+ tokens, fewer than one block of 512"):
        pack_blocks(["A short text.", "Another one."], toks[arch], 512, arch)


# ---- batches ----------------------------------------------------------------------------------------------------


def make_batches(blocks, toks, arch, seed=7, batch_size=8):
    return Batches(blocks[arch], batch_size, seed, toks[arch], mlm=arch == "bert", mlm_probability=0.15)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_batch_is_a_pure_function_of_seed_and_index(blocks, toks, arch):
    a, b = make_batches(blocks, toks, arch), make_batches(blocks, toks, arch)
    indices = [0, 5, a.steps_per_epoch + 3, 3 * a.steps_per_epoch + 1]
    torch.manual_seed(0)
    first = {i: a.batch(i) for i in indices}
    torch.manual_seed(123)  # the global RNG must not matter
    for i in reversed(indices):
        other = b.batch(i)
        assert other.keys() == {"input_ids", "labels"}
        assert torch.equal(other["input_ids"], first[i]["input_ids"])
        assert torch.equal(other["labels"], first[i]["labels"])
    assert torch.equal(a.batch(5)["input_ids"], first[5]["input_ids"])  # and after other calls on the same object
    c = make_batches(blocks, toks, arch, seed=8)
    assert not torch.equal(c.batch(0)["input_ids"], first[0]["input_ids"])


def test_each_epoch_is_a_new_permutation_of_all_blocks(blocks, toks):
    bt = make_batches(blocks, toks, "gpt2")
    spe, n = bt.steps_per_epoch, len(blocks["gpt2"])
    assert spe == n // 8

    def epoch_rows(e):
        ids = torch.cat([bt.batch(e * spe + s)["input_ids"] for s in range(spe)])
        return [blocks["gpt2"].tolist().index(r) for r in ids.tolist()[:40]], ids

    rows0, ids0 = epoch_rows(0)
    rows1, ids1 = epoch_rows(1)
    assert rows0 != rows1 and rows0 != sorted(rows0)
    assert len(ids0) == spe * 8 and len({tuple(r) for r in ids0.tolist()}) == len(ids0)  # no repeats in an epoch


def test_mlm_masking_rate_and_80_10_10(blocks, toks):
    tok, bt = toks["bert"], make_batches(blocks, toks, "bert", batch_size=16)
    mask_id = tok.mask_token_id
    special = torch.tensor(tok.all_special_ids)
    n_maskable = n_masked = n_mask_tok = n_same = n_random = 0
    for i in range(bt.steps_per_epoch * 2):
        out = bt.batch(i)
        rows = out["input_ids"]
        # Recover the original blocks: unmasked positions keep their token, masked ones are in labels.
        masked = out["labels"] != -100
        orig = torch.where(masked, out["labels"], rows)
        assert torch.equal((rows != orig), masked & (rows != orig))  # changes only at masked positions
        is_special = torch.isin(orig, special)
        assert not (masked & is_special).any()  # [CLS], [SEP] (also mid-block) are never masked
        assert (orig[:, 0] == tok.cls_token_id).all()
        n_maskable += int((~is_special).sum())
        n_masked += int(masked.sum())
        n_mask_tok += int((masked & (rows == mask_id)).sum())
        n_same += int((masked & (rows == orig)).sum())
        n_random += int((masked & (rows != orig) & (rows != mask_id)).sum())
    assert n_masked > 5000
    # Tolerances are > 6 standard deviations at these counts, so the test is not flaky but still catches bugs.
    assert abs(n_masked / n_maskable - 0.15) < 0.01
    assert abs(n_mask_tok / n_masked - 0.80) < 0.03
    assert abs(n_random / n_masked - 0.10) < 0.03
    assert abs(n_same / n_masked - 0.10) < 0.03


def test_mlm_labels_are_minus_100_exactly_where_unmasked(blocks, toks):
    b = blocks["bert"]
    bt = Batches(b, len(b), 1, toks["bert"], mlm=True)  # one batch = every block, in permuted order
    out = bt.batch(0)
    orig = b[bt.order(0)]
    masked = out["labels"] != -100
    assert torch.equal(out["labels"][masked], orig[masked])
    assert torch.equal(out["input_ids"][~masked], orig[~masked])
    assert 0.05 < masked.float().mean() < 0.25


def test_gpt_labels_equal_input_ids_including_eos(blocks, toks):
    bt = make_batches(blocks, toks, "gpt2")
    seen_eos = False
    for i in range(10):
        out = bt.batch(i)
        assert torch.equal(out["labels"], out["input_ids"])
        seen_eos |= bool((out["labels"] == toks["gpt2"].eos_token_id).any())
    assert seen_eos


def test_too_few_blocks_for_a_batch_raises(blocks, toks):
    with pytest.raises(ApolloError):
        Batches(blocks["gpt2"][:3], 4, 0, toks["gpt2"], mlm=False)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_valid_batches_are_ordered_and_fixed(blocks, toks, arch):
    b, tok, mlm = blocks[arch], toks[arch], arch == "bert"
    vb = valid_batches(b, 8, tok, mlm, 0.15, 0, max_blocks=20)
    assert [len(x["input_ids"]) for x in vb] == [8, 8, 4]
    labels = torch.cat([x["labels"] for x in vb])
    inputs = torch.cat([x["input_ids"] for x in vb])
    orig = torch.where(labels != -100, labels, inputs) if mlm else inputs
    assert torch.equal(orig, b[:20])  # the first blocks, in order
    again = valid_batches(b, 8, tok, mlm, 0.15, 0, max_blocks=20)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
               for x, y in zip(vb, again, strict=True))
    assert sum(len(x["input_ids"]) for x in valid_batches(b, 8, tok, mlm, 0.15, 0, max_blocks=0)) == len(b)


# ---- load_lm_data -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("\n".join(corpus[:400]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_load_lm_data_holds_out_the_tail(corpus_file, arch):
    model = ModelConfig(arch=arch, vocab=400, seq_len=SEQ)
    data = load_lm_data(DataConfig(data=(str(corpus_file),), valid_fraction=0.1), model, seed=0)
    assert isinstance(data, LMData) and data.mlm == (arch == "bert") and str(corpus_file) in data.source
    everything = pack_blocks(read_text_files([str(corpus_file)]), data.tokenizer, SEQ, arch)
    n_valid = int(len(everything) * 0.1)
    assert len(data.valid) == n_valid > 0
    assert torch.equal(data.train, everything[:-n_valid]) and torch.equal(data.valid, everything[-n_valid:])
    assert len(data.tokenizer) <= 400


def test_load_lm_data_with_valid_files_and_saved_tokenizer(tmp_path, corpus, corpus_file, toks):
    valid = tmp_path / "valid.txt"
    valid.write_text("\n".join(corpus[400:450]) + "\n", encoding="utf-8")
    toks["bert"].save_pretrained(tmp_path / "tok")
    cfg = DataConfig(data=(str(corpus_file),), valid=(str(valid),), tokenizer=str(tmp_path / "tok"))
    data = load_lm_data(cfg, ModelConfig(arch="bert", vocab=400, seq_len=SEQ), seed=0)
    assert data.tokenizer.get_vocab() == toks["bert"].get_vocab()
    assert torch.equal(data.valid, pack_blocks(read_text_files([str(valid)]), toks["bert"], SEQ, "bert"))
    assert len(data.train) == len(pack_blocks(read_text_files([str(corpus_file)]), toks["bert"], SEQ, "bert"))
    with pytest.raises(ApolloError, match="more than model vocab"):
        load_lm_data(cfg, ModelConfig(arch="bert", vocab=300, seq_len=SEQ), seed=0)
    with pytest.raises(ApolloError, match="cannot load tokenizer"):
        load_lm_data(DataConfig(tokenizer=str(tmp_path / "nope")), ModelConfig(vocab=400, seq_len=SEQ), seed=0)


def test_load_lm_data_synthetic_default_and_nothing_left_to_train():
    model = ModelConfig(arch="gpt2", vocab=400, seq_len=SEQ)
    data = load_lm_data(DataConfig(synthetic_sentences=300), model, seed=5)
    assert "synthetic" in data.source and len(data.valid) >= 1 and len(data.train) > 10
    assert torch.equal(load_lm_data(DataConfig(synthetic_sentences=300), model, seed=6).train, data.train)
    # A corpus of exactly one block: the held-out block would leave nothing to train on.
    texts = synthetic_corpus(4)
    n_tokens = sum(len(r) + 1 for r in train_tokenizer(texts, "gpt2", 300)(texts)["input_ids"])
    with pytest.raises(ApolloError, match="nothing left to train"):
        load_lm_data(DataConfig(synthetic_sentences=4), ModelConfig(arch="gpt2", vocab=300, seq_len=n_tokens), seed=0)


def test_load_lm_data_through_datasets_text_loader_matches_local_files(tmp_path, monkeypatch):
    """The `datasets` route (--dataset text --data FILE) gives the same blocks as reading the file directly."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # keep ~/.cache clean
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(synthetic_corpus(400)), encoding="utf-8")
    model = ModelConfig(arch="gpt2", vocab=300, seq_len=16, layers=2, hidden=16, heads=2, ffn=32)
    local = load_lm_data(DataConfig(data=(str(path),)), model, seed=0)
    via_hf = load_lm_data(DataConfig(dataset="text", data=(str(path),)), model, seed=0)
    assert torch.equal(local.train, via_hf.train) and torch.equal(local.valid, via_hf.valid)
    assert via_hf.source.startswith("text (")


def test_validation_masks_do_not_depend_on_batch_size():
    texts = synthetic_corpus(300)
    tok = train_tokenizer(texts, "bert", 300)
    blocks = pack_blocks(texts, tok, 16, "bert")[:10]
    a = valid_batches(blocks, 3, tok, True, 0.15, 0, 0)
    b = valid_batches(blocks, 5, tok, True, 0.15, 0, 0)
    for key in ("input_ids", "labels"):
        assert torch.equal(torch.cat([x[key] for x in a]), torch.cat([x[key] for x in b]))
    assert [len(x["input_ids"]) for x in a] == [3, 3, 3, 1]
