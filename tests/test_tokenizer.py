"""mmssl's tokenizer gives exactly open_clip's SimpleTokenizer output, fast path or not."""

import random
import string

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from mmssl.tokenizer import ClipTokenizer

CAPTIONS = [
    "the number 7",
    "  A Handwritten   SEVEN  ",
    "",
    "don't stop: it's 3 o'clock, isn't it?",
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",  # non-ASCII: ftfy path
    "\u201ccurly quotes\u201d and \ufb01 ligature",
    "AT&amp;T &lt;b&gt; tag",  # HTML entities: unescaped by open_clip's cleaning
    "tabs\tand\nnew lines\r\n",
    "mojibake: Ã©t\u00e9",
    "\u3053\u3093\u306b\u3061\u306f emoji \U0001f600",
    "word " * 40,  # longer than the context: cut, end token last
]


@pytest.mark.parametrize("context", [8, 16, 77])
def test_same_ids_as_open_clip(context):
    ours, theirs = ClipTokenizer(context), SimpleTokenizer(context_length=context)
    rng = random.Random(0)
    printable = string.printable[:95]  # every printable ASCII character, "&" included
    randoms = ["".join(rng.choice(printable) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    for caption in CAPTIONS + randoms:
        assert torch.equal(ours([caption]), theirs([caption])), caption
    assert torch.equal(ours(CAPTIONS), theirs(CAPTIONS))
    assert ours(CAPTIONS).dtype == torch.long and ours(CAPTIONS).shape == (len(CAPTIONS), context)


def test_fast_path_skips_only_what_is_the_identity():
    tok = ClipTokenizer(16)
    assert tok.clean("  The  Number 7 ") == "the number 7"
    assert tok.clean("a &amp; b") == "a & b"  # not plain: open_clip's cleaning unescapes it
    assert tok([]).shape == (0, 16)
