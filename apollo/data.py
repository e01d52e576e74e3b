"""Language-model data: corpus -> tokenizer -> packed blocks -> deterministic batches.

Every batch is a pure function of (seed, micro-batch index), so all methods see the same data in the same order
and a resumed run continues exactly where it stopped, whatever the global RNG state.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .config import ApolloError, DataConfig, ModelConfig
from .models import is_masked

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
GPT2_EOS = "<|endoftext|>"
_TOKENIZE_CHUNK = 10_000  # texts per batched tokenizer call in pack_blocks

# ---- synthetic corpus ------------------------------------------------------------------------------------------

# Each topic: agents (sing, plur), objects (sing, plur), places, transitive and intransitive verbs (base, 3sg,
# past) and adjectives. Agents act on the topic's objects, so topic words co-occur the way real text does.
_TOPICS = (
    {
        "agents": (("farmer", "farmers"), ("shepherd", "shepherds"), ("dog", "dogs"), ("horse", "horses"),
                   ("goat", "goats"), ("sheep", "sheep"), ("child", "children")),
        "objects": (("apple", "apples"), ("fence", "fences"), ("basket", "baskets"), ("cart", "carts"),
                    ("bucket", "buckets"), ("seed", "seeds"), ("gate", "gates"), ("haystack", "haystacks")),
        "places": ("barn", "field", "meadow", "orchard", "stable", "hill"),
        "trans": (("carry", "carries", "carried"), ("watch", "watches", "watched"), ("push", "pushes", "pushed"),
                  ("paint", "paints", "painted"), ("fix", "fixes", "fixed"), ("find", "finds", "found")),
        "intrans": (("sleep", "sleeps", "slept"), ("rest", "rests", "rested"), ("wander", "wanders", "wandered"),
                    ("graze", "grazes", "grazed")),
        "adjs": ("muddy", "green", "wooden", "golden", "hungry"),
    },
    {
        "agents": (("sailor", "sailors"), ("captain", "captains"), ("fisherman", "fishermen"), ("gull", "gulls"),
                   ("diver", "divers"), ("pirate", "pirates")),
        "objects": (("net", "nets"), ("rope", "ropes"), ("boat", "boats"), ("sail", "sails"),
                    ("anchor", "anchors"), ("map", "maps"), ("shell", "shells"), ("lantern", "lanterns")),
        "places": ("harbor", "shore", "island", "dock", "bay", "lighthouse"),
        "trans": (("pull", "pulls", "pulled"), ("mend", "mends", "mended"), ("tie", "ties", "tied"),
                  ("lower", "lowers", "lowered"), ("spot", "spots", "spotted"), ("steer", "steers", "steered")),
        "intrans": (("sail", "sails", "sailed"), ("swim", "swims", "swam"), ("wait", "waits", "waited"),
                    ("sing", "sings", "sang")),
        "adjs": ("salty", "blue", "wet", "stormy", "distant"),
    },
    {
        "agents": (("cook", "cooks"), ("baker", "bakers"), ("waiter", "waiters"), ("chef", "chefs"),
                   ("guest", "guests"), ("woman", "women")),
        "objects": (("loaf", "loaves"), ("cake", "cakes"), ("pie", "pies"), ("pot", "pots"), ("knife", "knives"),
                    ("cup", "cups"), ("plate", "plates"), ("onion", "onions")),
        "places": ("kitchen", "bakery", "table", "window", "pantry", "stove"),
        "trans": (("bake", "bakes", "baked"), ("cut", "cuts", "cut"), ("wash", "washes", "washed"),
                  ("stir", "stirs", "stirred"), ("serve", "serves", "served"), ("taste", "tastes", "tasted")),
        "intrans": (("smile", "smiles", "smiled"), ("hurry", "hurries", "hurried"), ("laugh", "laughs", "laughed"),
                    ("eat", "eats", "ate")),
        "adjs": ("warm", "sweet", "fresh", "hot", "crisp"),
    },
    {
        "agents": (("scientist", "scientists"), ("student", "students"), ("professor", "professors"),
                   ("engineer", "engineers"), ("robot", "robots"), ("assistant", "assistants")),
        "objects": (("sample", "samples"), ("crystal", "crystals"), ("microscope", "microscopes"),
                    ("notebook", "notebooks"), ("magnet", "magnets"), ("battery", "batteries"), ("wire", "wires"),
                    ("formula", "formulas")),
        "places": ("laboratory", "library", "office", "workshop", "basement", "computer"),
        "trans": (("measure", "measures", "measured"), ("test", "tests", "tested"), ("study", "studies", "studied"),
                  ("record", "records", "recorded"), ("heat", "heats", "heated"), ("build", "builds", "built")),
        "intrans": (("think", "thinks", "thought"), ("work", "works", "worked"), ("argue", "argues", "argued"),
                    ("listen", "listens", "listened")),
        "adjs": ("precise", "electric", "tiny", "heavy", "complex"),
    },
    {
        "agents": (("driver", "drivers"), ("merchant", "merchants"), ("tourist", "tourists"),
                   ("officer", "officers"), ("musician", "musicians"), ("man", "men")),
        "objects": (("ticket", "tickets"), ("bus", "buses"), ("bicycle", "bicycles"), ("coin", "coins"),
                    ("letter", "letters"), ("umbrella", "umbrellas"), ("newspaper", "newspapers"), ("key", "keys")),
        "places": ("station", "square", "bridge", "street", "market", "museum"),
        "trans": (("buy", "buys", "bought"), ("sell", "sells", "sold"), ("drop", "drops", "dropped"),
                  ("read", "reads", "read"), ("lose", "loses", "lost"), ("deliver", "delivers", "delivered")),
        "intrans": (("walk", "walks", "walked"), ("talk", "talks", "talked"), ("shout", "shouts", "shouted"),
                    ("stop", "stops", "stopped")),
        "adjs": ("crowded", "noisy", "expensive", "modern", "narrow"),
    },
    {
        "agents": (("hunter", "hunters"), ("fox", "foxes"), ("wolf", "wolves"), ("owl", "owls"), ("deer", "deer"),
                   ("traveler", "travelers"), ("bear", "bears")),
        "objects": (("branch", "branches"), ("mushroom", "mushrooms"), ("stone", "stones"), ("berry", "berries"),
                    ("feather", "feathers"), ("nest", "nests"), ("log", "logs"), ("acorn", "acorns")),
        "places": ("forest", "river", "cave", "valley", "clearing", "waterfall"),
        "trans": (("gather", "gathers", "gathered"), ("follow", "follows", "followed"), ("hide", "hides", "hid"),
                  ("chase", "chases", "chased"), ("catch", "catches", "caught"), ("drag", "drags", "dragged")),
        "intrans": (("howl", "howls", "howled"), ("run", "runs", "ran"), ("climb", "climbs", "climbed"),
                    ("hunt", "hunts", "hunted")),
        "adjs": ("wild", "tall", "silent", "shadowy", "ancient"),
    },
)
_ADJS = ("old", "young", "small", "large", "quiet", "busy", "bright", "dark", "careful", "happy", "tired", "strange",
         "famous", "clever", "gentle", "brave", "proud", "calm", "lazy", "eager")
_FREQ_ADVS = ("often", "always", "never", "rarely", "sometimes", "usually")
_MANNER_ADVS = ("slowly", "quickly", "quietly", "carefully", "happily", "loudly")
_PREPS = ("near", "behind", "beside", "by", "around", "past")
_SING_DETS = ("the", "the", "the", "a", "this", "that", "every", "one")
_PLUR_DETS = ("the", "the", "the", "some", "these", "those", "many", "several", "two", "three", "four", "five")
_SING_INDEF = ("a", "a", "one")
_PLUR_INDEF = ("some", "many", "several", "two", "three", "four", "five")
# Time phrases and sentence openers carry the paragraph's tense, a long-range dependency a model can pick up.
_TIMES = {"present": ("every day", "in the morning", "at night", "on weekends", "each spring", "most evenings"),
          "past": ("yesterday", "last week", "long ago", "that morning", "last winter", "one evening")}
_OPENERS = {"present": ("usually", "meanwhile", "also"), "past": ("then", "later", "afterwards")}


class _Grammar:
    """Sentence generator for one paragraph: a fixed topic and tense, drawn from the caller's rng."""

    def __init__(self, rng: random.Random, topic: dict, tense: str):
        self.rng, self.t, self.tense = rng, topic, tense

    def np(self, kind: str, plural: bool, indefinite: bool = False) -> str:
        r = self.rng
        words = [r.choice(self.t[kind])[plural]]
        if r.random() < 0.35:  # agents take general adjectives, objects mostly the topic's own
            words.insert(0, r.choice(self.t["adjs"] if kind == "objects" and r.random() < 0.7 else _ADJS))
        if indefinite:
            det = r.choice(_PLUR_INDEF if plural else _SING_INDEF)
        else:
            det = r.choice(_PLUR_DETS if plural else _SING_DETS)
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        return " ".join([det, *words])

    def verb(self, kind: str, plural: bool) -> str:
        base, third, past = self.rng.choice(self.t[kind])
        return past if self.tense == "past" else base if plural else third

    def be(self, plural: bool) -> str:
        if self.tense == "past":
            return "were" if plural else "was"
        return "are" if plural else "is"

    def pp(self) -> str:
        return f"{self.rng.choice(_PREPS)} the {self.rng.choice(self.t['places'])}"

    def sentence(self) -> str:
        r = self.rng
        pl, pl2 = r.random() < 0.4, r.random() < 0.4
        subj, obj = self.np("agents", pl), self.np("objects", pl2)
        form = r.randrange(10)
        if form == 0:
            s = f"{subj} {self.verb('trans', pl)} {obj}"
        elif form == 1:
            s = f"{subj} {self.verb('trans', pl)} {obj} {self.pp()}"
        elif form == 2:
            s = f"{subj} {r.choice(_FREQ_ADVS)} {self.verb('intrans', pl)} {r.choice(_MANNER_ADVS)} {self.pp()}"
        elif form == 3:
            s = f"{r.choice(_TIMES[self.tense])}, {subj} {self.verb('trans', pl)} {obj}"
        elif form == 4:  # agreement across an attractor noun in the PP
            s = f"{subj} {self.pp()} {self.verb('intrans', pl)}"
        elif form == 5:  # relative clause: both verbs agree with the head noun, not the nearer object
            s = f"{subj} that {self.verb('trans', pl)} {obj} {self.verb('intrans', pl)} {r.choice(_MANNER_ADVS)}"
        elif form == 6:
            s = f"{subj} {self.be(pl)} {r.choice(_ADJS)}"
        elif form == 7:  # coordination makes the subject plural
            s = f"{self.np('agents', False)} and {self.np('agents', r.random() < 0.5)} {self.verb('trans', True)} {obj}"
        elif form == 8:
            aux = "did" if self.tense == "past" else "do" if pl else "does"
            s = f"{subj} {aux} not {r.choice(self.t['trans'])[0]} {obj}"
        else:
            s = f"there {self.be(pl2)} {self.np('objects', pl2, indefinite=True)} {self.pp()}"
        if form != 3 and r.random() < 0.15:
            s = f"{r.choice(_OPENERS[self.tense])}, {s}"
        return s[0].upper() + s[1:] + "."


def synthetic_corpus(n_sentences: int, seed: int = 0) -> list[str]:
    """A deterministic English-like demo corpus: one string per paragraph of 3-8 sentences on one topic."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    left = n_sentences
    while left > 0:
        g = _Grammar(rng, rng.choice(_TOPICS), rng.choice(("present", "past")))
        k = min(left, rng.randint(3, 8))
        paragraphs.append(" ".join(g.sentence() for _ in range(k)))
        left -= k
    return paragraphs


# ---- text sources ----------------------------------------------------------------------------------------------


MAX_OVERLAP = 0.1  # WikiText-2's validation repeats 0.06% of its long lines from train


def overlap(train: Sequence[str], valid: Sequence[str], min_chars: int = 40) -> float:
    """Fraction of the validation text's long lines (>= ``min_chars``; headings and short lines repeat
    naturally) that occur verbatim in the training text."""
    seen = {line.strip() for line in train if len(line.strip()) >= min_chars}
    long = [line.strip() for line in valid if len(line.strip()) >= min_chars]
    return sum(line in seen for line in long) / len(long) if long else 0.0


def check_overlap(train: Sequence[str], valid: Sequence[str], allow: bool) -> None:
    """Refuse a validation text that mostly repeats the training text (a loss on training text is a wrong number)."""
    share = overlap(train, valid)
    if share > MAX_OVERLAP and not allow:
        raise ApolloError(f"{100 * share:.0f}% of the validation text's long lines are in the training text "
                          "(the same file twice?); pass --allow-overlap to use it anyway")


def read_text_files(paths: Sequence[str]) -> list[str]:
    """Non-blank lines of local UTF-8 text files, in order; the same file twice is refused."""
    resolved = [Path(p).resolve() for p in paths]
    twice = sorted({str(p) for p in paths if resolved.count(Path(p).resolve()) > 1})
    if twice:
        raise ApolloError(f"the same data file is given twice: {twice[0]}")
    lines: list[str] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise ApolloError(f"data file not found: {path}")
        if p.is_dir():
            raise ApolloError(f"data file is a directory: {path}")
        if not p.is_file():  # a FIFO, socket or device: reading it may never end
            raise ApolloError(f"data file is not a regular file (a pipe, socket or device): {path}")
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ApolloError(f"cannot read data file {path}: {e.strerror or e.__class__.__name__}") from None
        if b"\0" in raw:
            raise ApolloError(f"data file is binary (contains NUL bytes): {path}")
        try:
            text = raw.decode("utf-8-sig")  # -sig: a leading BOM is not text
        except UnicodeDecodeError as e:
            raise ApolloError(f"data file is not UTF-8 (bad byte at offset {e.start}): {path}") from None
        # split("\n") rather than splitlines(): the latter also breaks on form feeds and Unicode separators.
        found = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
        if not found:
            raise ApolloError(f"data file has no text: {path}")
        lines += found
    return lines


def hf_texts(name: str, config: str = "", split: str = "train", data_files=None, text_column: str = "text",
             cache_dir: str | None = None) -> list[str]:
    """Non-blank texts of one split of a `datasets` dataset (a Hub name, or a packaged loader such as "text")."""
    import datasets  # deferred: importing datasets is slow and only this path needs it

    what = f"{name}/{config}" if config else name
    try:
        ds = datasets.load_dataset(name, config or None, split=split, data_files=data_files, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many unrelated types (network, missing split, bad files, ...)
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise ApolloError(f"cannot load dataset {what} split {split}: {e.__class__.__name__}: {msg}") from None
    if text_column not in ds.column_names:
        raise ApolloError(f"dataset {what} has no column {text_column!r} (columns: {', '.join(ds.column_names)})")
    texts = [t for t in ds[text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ApolloError(f"dataset {what} split {split} has no text in column {text_column!r}")
    return texts


# ---- tokenizer and packing -------------------------------------------------------------------------------------


def _alphabet(texts: list[str], normalizer: normalizers.Normalizer, limit: int) -> list[str]:
    """The `limit` most frequent non-space characters after normalization; ties broken by code point."""
    # Count raw code points in C, then normalize each distinct one: the BERT normalizer works per character,
    # and normalizing 10 MB as one string is ~50x slower than this.
    raw = np.bincount(np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32))
    counts: dict[str, int] = {}
    for code in np.flatnonzero(raw):
        for ch in normalizer.normalize_str(chr(code)):
            if not ch.isspace():
                counts[ch] = counts.get(ch, 0) + int(raw[code])
    return sorted(counts, key=lambda ch: (-counts[ch], ch))[:limit]


def _wordpiece(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Capped so every character and its "##" form fit with room for subwords; rarer characters become [UNK].
    alphabet = _alphabet(texts, tok.normalizer, min(1000, max(1, (vocab_size - len(BERT_SPECIALS)) // 4)))
    # WordPieceTrainer assigns ids to "##x" pieces in hash-map order, which changes merge tie-breaks and so the
    # vocab from run to run (huggingface/tokenizers#1794). Registering them up front, sorted, makes training
    # deterministic; they are passed as "special" only for that and are plain vocab entries in the final model.
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=[*BERT_SPECIALS, *(f"##{c}" for c in alphabet)],
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    vocab = tok.get_vocab(with_added_tokens=False)
    clean = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    clean.normalizer, clean.pre_tokenizer = tok.normalizer, tok.pre_tokenizer
    clean.decoder = decoders.WordPiece(prefix="##")
    clean.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return clean


def _byte_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    if vocab_size < 257:
        raise ApolloError(f"gpt2 byte-level BPE needs vocab >= 257 (256 bytes + {GPT2_EOS}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT2_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def masked(arch: str) -> bool:
    """Masked LM (BERT, RoBERTa: WordPiece, [CLS] ... [SEP] blocks) or causal LM (byte-level BPE, eos separators)."""
    return is_masked(arch)


def train_tokenizer(texts: list[str], arch: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece (masked LMs) or GPT-2-style byte-level BPE tokenizer (causal LMs);
    deterministic, <= vocab_size tokens."""
    if masked(arch):
        names = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
        specials = dict(zip(names, BERT_SPECIALS, strict=True))
        fast = PreTrainedTokenizerFast(tokenizer_object=_wordpiece(texts, vocab_size), **specials)
    else:
        # No pad token: blocks are fixed-length, and pad == eos would let collators hide the separators from the loss.
        fast = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(texts, vocab_size), bos_token=GPT2_EOS,
                                       eos_token=GPT2_EOS, unk_token=GPT2_EOS)
    if len(fast) > vocab_size:
        raise ApolloError(f"trained {arch} tokenizer has {len(fast)} tokens, more than vocab {vocab_size}")
    return fast


def _separator_id(tokenizer: PreTrainedTokenizerBase, arch: str) -> int:
    sep = tokenizer.sep_token_id if masked(arch) else tokenizer.eos_token_id
    if sep is None:
        raise ApolloError(f"tokenizer has no {'[SEP]' if masked(arch) else 'eos'} token for arch {arch}")
    return sep


def pack_blocks(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int, arch: str) -> torch.Tensor:
    """Tokenize, join texts with a separator (after each text), and cut into [n_blocks, seq_len]; drop the rest."""
    sep = _separator_id(tokenizer, arch)
    body = seq_len - 2 if masked(arch) else seq_len  # masked LMs reserve [CLS] ... [SEP]
    if body < 1:
        raise ApolloError(f"seq_len {seq_len} is too short for {arch}")
    chunks = [np.zeros(0, dtype=np.int64)]
    for start in range(0, len(texts), _TOKENIZE_CHUNK):  # chunked: Python int lists cost ~36 bytes per token
        rows = tokenizer(texts[start : start + _TOKENIZE_CHUNK], add_special_tokens=False,
                         return_attention_mask=False)["input_ids"]
        flat = itertools.chain.from_iterable(itertools.chain(row, (sep,)) for row in rows)
        chunks.append(np.fromiter(flat, dtype=np.int64))
    ids = np.concatenate(chunks)
    n = len(ids) // body
    if n == 0:
        raise ApolloError(f"corpus has {len(ids)} tokens, fewer than one block of {seq_len}")
    blocks = torch.from_numpy(ids[: n * body]).view(n, body)
    if masked(arch):
        cls = torch.full((n, 1), tokenizer.cls_token_id, dtype=torch.long)
        blocks = torch.cat([cls, blocks, torch.full((n, 1), sep, dtype=torch.long)], dim=1)
    return blocks


# ---- assembling a run's data -----------------------------------------------------------------------------------


@dataclass
class LMData:
    tokenizer: PreTrainedTokenizerBase
    train: torch.Tensor  # [n_train, seq_len] token ids
    valid: torch.Tensor  # [n_valid, seq_len]
    mlm: bool  # masked LM (bert, roberta) vs causal LM (gpt2, llama)
    source: str  # human description of where the text came from
    test: torch.Tensor | None = None  # [n_test, seq_len], scored once at the end; None = no test files


def _load_tokenizer(path: str, model: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # missing dir, bad json, unknown class, ... all mean "not a usable tokenizer"
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise ApolloError(f"cannot load tokenizer {path}: {e.__class__.__name__}: {msg}") from None
    if len(tok) > model.vocab:
        raise ApolloError(f"tokenizer {path} has {len(tok)} tokens, more than model vocab {model.vocab}")
    needed = ("cls_token", "sep_token", "mask_token") if masked(model.arch) else ("eos_token",)
    missing = [name for name in needed if getattr(tok, name) is None]
    if missing:
        raise ApolloError(f"tokenizer {path} lacks {', '.join(missing)} needed for {model.arch}")
    tok.model_max_length = int(1e30)  # a saved run's tokenizer truncates to its block size; packing needs whole texts
    return tok


def load_lm_data(data: DataConfig, model: ModelConfig, seed: int) -> LMData:
    """Text source (dataset > files > synthetic), tokenizer (saved or trained), and packed train/valid blocks.

    The data deliberately does not depend on ``seed`` (the synthetic corpus always uses seed 0), so runs with
    different training seeds share one corpus and one train/valid split; ``seed`` is accepted for the trainer's API.
    """
    del seed
    if data.dataset:
        # --data / --valid, when given, are the dataset's data_files (e.g. --dataset json --data train.jsonl).
        def split(name: str, files: tuple[str, ...]) -> list[str]:
            return hf_texts(data.dataset, data.dataset_config, name, data_files=list(files) or None,
                            text_column=data.text_column)

        texts = split("train", data.data)
        if data.valid:
            valid_texts = split("train", data.valid)
        else:
            try:
                valid_texts = None if data.data else split("validation", ())
            except ApolloError:  # no validation split: hold out the tail of train below
                valid_texts = None
        source = f"{data.dataset}/{data.dataset_config}" if data.dataset_config else data.dataset
        if data.data:
            source += f" ({', '.join(data.data)})"
    else:
        if data.data:
            texts, source = read_text_files(data.data), ", ".join(data.data)
        else:
            texts = synthetic_corpus(data.synthetic_sentences, seed=0)
            source = f"synthetic English-like corpus ({data.synthetic_sentences} sentences, generated; not real text)"
        valid_texts = read_text_files(data.valid) if data.valid else None
    if data.valid:
        source += f"; validation: {', '.join(data.valid)}"
    if valid_texts is not None:
        check_overlap(texts, valid_texts, data.allow_overlap)

    tok = _load_tokenizer(data.tokenizer, model) if data.tokenizer else train_tokenizer(texts, model.arch, model.vocab)
    blocks = pack_blocks(texts, tok, model.seq_len, model.arch)
    if valid_texts is not None:
        train, valid = blocks, pack_blocks(valid_texts, tok, model.seq_len, model.arch)
    else:
        if not 0 <= data.valid_fraction < 1:
            raise ApolloError(f"valid_fraction must be in [0, 1), got {data.valid_fraction}")
        # The tail, not a random sample: neighbouring blocks share documents, so a contiguous split leaks less.
        n_valid = max(1, int(len(blocks) * data.valid_fraction))
        if n_valid >= len(blocks):
            raise ApolloError(f"corpus packs into {len(blocks)} blocks of {model.seq_len}: nothing left to train on "
                              f"after holding out {n_valid} for validation")
        train, valid = blocks[:-n_valid], blocks[-n_valid:]
    test = pack_blocks(read_text_files(data.test), tok, model.seq_len, model.arch) if data.test else None
    if data.test:
        source += f"; test: {', '.join(data.test)}"
    return LMData(tokenizer=tok, train=train, valid=valid, mlm=masked(model.arch), source=source, test=test)


# ---- batches ---------------------------------------------------------------------------------------------------


def _derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from parts (Python's hash() is salted per process, so it cannot be used)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _special_mask(blocks: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    # Vectorized stand-in for the collator's per-row get_special_tokens_mask; also covers mid-block separators.
    return torch.isin(blocks, torch.tensor(tokenizer.all_special_ids, dtype=torch.long))


def _mlm_collator(tokenizer: PreTrainedTokenizerBase, mlm_probability: float) -> DataCollatorForLanguageModeling:
    if not 0 < mlm_probability < 1:
        raise ApolloError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if tokenizer.mask_token is None:
        raise ApolloError("masked LM needs a tokenizer with a mask token")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)


def _make_batch(ids: torch.Tensor, special: torch.Tensor | None, collator, mask_seed: int) -> dict[str, torch.Tensor]:
    """Inputs and labels for a fresh copy `ids` of some blocks (it is modified in place for MLM)."""
    if collator is None:  # causal LM: the model shifts labels itself; separators stay in the loss
        return {"input_ids": ids, "labels": ids.clone()}
    # A fresh generator per batch makes the masks a pure function of mask_seed (the collator draws all of its
    # randomness - which tokens, and 80/10/10 - from self.generator).
    collator.generator = torch.Generator().manual_seed(mask_seed)
    input_ids, labels = collator.torch_mask_tokens(ids, special_tokens_mask=special)  # masks ids in place
    return {"input_ids": input_ids, "labels": labels}


class Batches:
    """Training micro-batches by global index: epoch e is a permutation seeded by (seed, e); masks by (seed, index)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int, tokenizer: PreTrainedTokenizerBase,
                 mlm: bool, mlm_probability: float = 0.15):
        if batch_size < 1:
            raise ApolloError(f"batch_size must be >= 1, got {batch_size}")
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        if self.steps_per_epoch == 0:
            raise ApolloError(f"{len(blocks)} training blocks, fewer than one batch of {batch_size}")
        self._collator = _mlm_collator(tokenizer, mlm_probability) if mlm else None
        self._special = _special_mask(blocks, tokenizer) if mlm else None
        self._perm: tuple[int, torch.Tensor] | None = None  # cache of the current epoch's order

    @property
    def steps_per_epoch(self) -> int:
        return len(self.blocks) // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """The block order of one epoch (a permutation of range(n_blocks))."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_derive_seed("order", self.seed, epoch))
            self._perm = (epoch, torch.randperm(len(self.blocks), generator=g))
        return self._perm[1]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        epoch, step = divmod(index, self.steps_per_epoch)
        rows = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        special = None if self._special is None else self._special[rows]
        # self.blocks[rows] is a copy (advanced indexing), so masking it in place leaves the blocks intact.
        return _make_batch(self.blocks[rows], special, self._collator, _derive_seed("mask", self.seed, index))


def valid_batches(blocks: torch.Tensor, batch_size: int, tokenizer: PreTrainedTokenizerBase, mlm: bool,
                  mlm_probability: float, seed: int, max_blocks: int) -> list[dict[str, torch.Tensor]]:
    """The first max_blocks (0 = all) validation blocks in order, batched, with fixed seeded masks.

    Each block's mask is seeded by (seed, block index), so the validation set is the same for any batch size.
    """
    if batch_size < 1:
        raise ApolloError(f"batch_size must be >= 1, got {batch_size}")
    blocks = blocks[:max_blocks] if max_blocks > 0 else blocks
    collator = _mlm_collator(tokenizer, mlm_probability) if mlm else None
    special = _special_mask(blocks, tokenizer) if mlm else None
    single = [_make_batch(blocks[i : i + 1].clone(), None if special is None else special[i : i + 1], collator,
                          _derive_seed("valid", seed, i)) for i in range(len(blocks))]
    return [{k: torch.cat([b[k] for b in single[s : s + batch_size]]) for k in single[0]}
            for s in range(0, len(single), batch_size)]
