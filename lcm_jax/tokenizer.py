"""A small word-level CLIPTokenizer built offline (loading one: lcm_jax.models.clip)."""
from __future__ import annotations

import json
import os
from typing import Sequence

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def build_word_tokenizer(folder: str, words: Sequence[str], model_max_length: int = 77):
    """A real byte-level-BPE CLIPTokenizer whose merges make each of ``words`` one token.

    The byte alphabet keeps every other text encodable (character by character); used for
    the tiny teachers, since no pretrained vocabulary can be downloaded here.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = dict.fromkeys(chars + [c + "</w>" for c in chars])
    merges: dict[str, None] = {}
    for w in words:
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merges[f"{toks[0]} {toks[1]}"] = None
            toks = [toks[0] + toks[1]] + toks[2:]
            vocab[toks[0]] = None
    vocab.update(dict.fromkeys(SPECIAL))
    os.makedirs(folder, exist_ok=True)
    raw = os.path.join(folder, "_raw")
    os.makedirs(raw, exist_ok=True)
    with open(os.path.join(raw, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(raw, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(raw, "vocab.json"), os.path.join(raw, "merges.txt"),
                        model_max_length=model_max_length)
    tok.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        os.remove(os.path.join(raw, name))
    os.rmdir(raw)
    return tok
