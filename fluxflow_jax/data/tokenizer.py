"""Tokenizer loading (local only) and fixed-length tokenisation.

``load_tokenizer(None | 'demo')`` gives the embedded uncased WordPiece tokenizer (a few hundred
words covering the demo captions, plus single-letter and ``##`` pieces so any ASCII word still
tokenises without [UNK]); any other value is a local directory read with
``AutoTokenizer.from_pretrained(dir, local_files_only=True)``. Nothing here touches the network.

Why ``from_pretrained(dir)`` and never ``BertTokenizerFast(vocab_file=...)``: in transformers 5.x
the latter silently ignores the file and maps every token to [UNK] (DESIGN.md, stack facts).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

DEMO_TOKENIZER_DIR = Path(__file__).parent / "demo_assets" / "tokenizer"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_DIGITS = [str(d) for d in range(10)]
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]

# HF fast tokenizers mutate their padding/truncation settings on every call; two threads calling
# one tokenizer at once raise "Already borrowed". Tokenisation is cheap next to image decoding.
_LOCK = threading.Lock()


def load_tokenizer(path: str | os.PathLike | None = None):
    """A HF tokenizer from a local directory, or the embedded demo tokenizer for None / 'demo'.

    A tokenizer without a pad token (GPT-2 style) gets ``pad = eos`` as in the reference.
    """
    # Only the tokenizer is used: transformers' "PyTorch was not found" advice is noise here.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    if path is None or str(path) == "demo":
        path = DEMO_TOKENIZER_DIR
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer: {str(path)!r} is not a local directory; fluxflow_jax never downloads - "
            "save the tokenizer with save_pretrained(dir) once and pass that directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise ValueError(f"tokenizer: cannot load a tokenizer from {str(path)!r}: {e}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {str(path)!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def tokenize(tokenizer, captions: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int32 [B, L], attention_mask int32 [B, L])``: padded to and truncated at
    ``max_length`` (the reference's ``padding='max_length', truncation=True``)."""
    with _LOCK:
        enc = tokenizer(list(captions), padding="max_length", truncation=True,
                        max_length=int(max_length), return_attention_mask=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32).reshape(len(captions), int(max_length))
    mask = np.asarray(enc["attention_mask"], dtype=np.int32).reshape(len(captions), int(max_length))
    return ids, mask


def wordpiece_vocab(words: Iterable[str]) -> list[str]:
    """Vocabulary list: BERT specials first ([PAD]=0), punctuation, digits, letters, their ``##``
    continuations, then ``words`` (lower-cased, deduplicated, in first-seen order)."""
    vocab = list(SPECIAL_TOKENS) + _PUNCT + _DIGITS + _LETTERS
    vocab += ["##" + c for c in _LETTERS + _DIGITS]
    seen = set(vocab)
    for w in words:
        w = w.strip().lower()
        if w and w not in seen:
            seen.add(w)
            vocab.append(w)
    return vocab


def write_wordpiece_tokenizer(out_dir: str | os.PathLike, words: Iterable[str]) -> Path:
    """Write an uncased BERT-style WordPiece tokenizer that ``AutoTokenizer.from_pretrained``
    loads offline in transformers 4.57+ and 5.x: ``vocab.txt``, ``tokenizer.json`` (built with the
    ``tokenizers`` library, version independent), ``tokenizer_config.json``,
    ``special_tokens_map.json``. Used to build the embedded demo tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = wordpiece_vocab(words)
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ids = {t: i for i, t in enumerate(vocab)}
    tk = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                               strip_accents=None, lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.save(str(out / "tokenizer.json"))
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                "sep_token": "[SEP]", "mask_token": "[MASK]"}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
              "model_max_length": 512, "strip_accents": None, "tokenize_chinese_chars": True,
              "clean_up_tokenization_spaces": True, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out
