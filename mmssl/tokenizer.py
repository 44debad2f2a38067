"""open_clip's BPE tokenizer with the same output at a fraction of its cost per caption.

open_clip's ``SimpleTokenizer`` cleans every caption with ftfy and a double HTML unescape before
byte-pair encoding it. For a caption of printable ASCII without ``&`` both are the identity (ftfy
only repairs non-ASCII text, control characters, line breaks and HTML entities), yet they cost about
two thirds of the tokenizer's time; such captions skip them here, and every other caption goes
through open_clip's own cleaning. The BPE merges, vocabulary, cache and split pattern are
open_clip's. ``tests/test_tokenizer.py`` checks the output equals ``SimpleTokenizer``'s on plain,
accented, HTML-escaped, control-character and over-long captions.

A local Hugging Face model's own tokenizer (``model.text.kind=hf``) is offered through the same call
by :class:`HFTokenizer`.

Axis legend: N captions, L context length.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import torch
from open_clip.tokenizer import SimpleTokenizer

from mmssl.optional import quiet_transformers, require

# printable ASCII (space to tilde) except "&", which could start an HTML entity
_PLAIN = re.compile(r"[ -%'-~]*")


class ClipTokenizer:
    """``captions -> LongTensor [N, L]``: start token, BPE ids, end token, zero padding; an over-long
    caption is cut to ``L`` tokens with the end token last (open_clip's convention)."""

    def __init__(self, context_length: int):
        self.base = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.sot_token_id = self.base.sot_token_id
        self.eot_token_id = self.base.eot_token_id
        self.vocab_size = self.base.vocab_size

    def clean(self, text: str) -> str:
        if _PLAIN.fullmatch(text):
            return " ".join(text.split()).lower()  # open_clip's whitespace_clean + lower
        return self.base.clean_fn(text)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption, without start and end tokens."""
        base, ids = self.base, []
        for token in base.pat.findall(self.clean(text)):
            token = "".join(base.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(base.encoder[piece] for piece in base.bpe(token).split(" "))
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        rows = []
        for text in texts:
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            rows.append(ids + [0] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)  # [N, L]

    def decode(self, ids: list[int]) -> str:
        return self.base.decode(ids)


@functools.cache
def load_hf_tokenizer(path: str) -> Any:
    """The tokenizer of a local Hugging Face model directory (``local_files_only``: nothing is
    downloaded), loaded once per process."""
    transformers = require("transformers", "model.text.kind=hf")
    # loader workers fork after the tokenizer is loaded: the Rust tokenizer's own threads would warn in each
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with quiet_transformers(transformers):
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


class HFTokenizer:
    """A Hugging Face tokenizer behind the same call as :class:`ClipTokenizer`: ``captions -> LongTensor
    [N, L]``, padded to ``L`` with the tokenizer's pad id, an over-long caption truncated (its special
    end token kept, as the tokenizer truncates)."""

    def __init__(self, path: str, context_length: int):
        self.base = load_hf_tokenizer(path)
        self.context_length = context_length
        self.pad_token_id = self.base.pad_token_id
        if self.pad_token_id is None:
            raise ValueError(f"model.text.hf_path={path}: its tokenizer has no padding token")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        out = self.base(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return out["input_ids"].long().reshape(len(texts), length)  # [N, L]

    def decode(self, ids: list[int]) -> str:
        return self.base.decode(ids, skip_special_tokens=True)
