"""FSDD as trimodal shards, for the benchmarks (``fsdd_benchmark.py``, ``fsdd_finetune.py``).

The Free Spoken Digit Dataset (``../shared/data/fsdd``: 3,000 real recordings, 6 speakers x 10 digits
x 50 repetitions): each recording of digit d is paired with a handwritten d (scikit-learn's 8x8
digits, rendered as in the demo; held-out images come from a disjoint pool) and a caption from the
demo's templates ("the number 7", "a handwritten seven", ...). One whole speaker is held out for
scoring; other speakers can be left out entirely (the test speaker, while settings are chosen on a
validation speaker).

Folders written under ``out``: ``heldout/`` (the held-out speaker, trimodal), ``full/`` and
``emergent/`` (training speakers; emergent samples carry image+caption or speech+caption, never
image+speech), ``train_speakers/`` (every fifth recording of the training speakers, trimodal and
paired afresh: the linear probe's training split and a same-voice retrieval check), ``classes.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

FILE_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
FORMAT_VERSION = 3  # 3: heldout/ (was test/), speakers left out entirely


def recordings(root: Path) -> list[tuple[Path, int, str]]:
    """(path, digit, speaker) of every recording, sorted by file name."""
    found = []
    for path in sorted((root / "recordings").glob("*.wav")):
        match = FILE_NAME.match(path.name)
        if match:
            found.append((path, int(match[1]), match[2]))
    return found


def speakers(root: Path) -> list[str]:
    return sorted({s for _, _, s in recordings(root)})


def image_pools(test_fraction: float, rng: np.random.Generator) -> tuple[list[np.ndarray], dict, dict]:
    """scikit-learn's digits (bundled, no download) split per class into train and test pools of indices."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, test = {}, {}
    for d in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == d))
        cut = int(round(len(idx) * test_fraction))
        test[d], train[d] = idx[:cut], idx[cut:]
    return list(digits.images), train, test


class Pairer:
    """Draws the image and caption that go with a recording of digit d (PNG bytes cached per image)."""

    def __init__(self, rng: np.random.Generator):
        from data_pipelines.demo import TEMPLATES

        self.rng, self.templates = rng, TEMPLATES
        self.images, self.train_pool, self.test_pool = image_pools(0.2, rng)
        self.png: dict[int, bytes] = {}

    def image(self, d: int, *, heldout: bool = False, rng: np.random.Generator | None = None) -> bytes:
        from data_pipelines.demo import render_digit

        i = int((rng or self.rng).choice((self.test_pool if heldout else self.train_pool)[d]))
        if i not in self.png:
            self.png[i] = render_digit(self.images[i])
        return self.png[i]

    def caption(self, d: int, rng: np.random.Generator | None = None) -> str:
        from data_pipelines.demo import caption_for

        return caption_for(d, self.templates[int((rng or self.rng).integers(len(self.templates)))])


def pair_training(found: list, pair: Pairer, copies: int) -> tuple[list[dict], list[dict]]:
    """The training speakers' samples: ``copies`` pairings per recording, full and emergent."""
    full, emergent = [], []
    for path, d, speaker in tqdm(found, desc="pairing FSDD", unit="recording"):
        wav, meta = path.read_bytes(), {"label": d, "speaker": speaker, "file": path.name}
        for c in range(copies):
            k = f"{path.stem}_{c}"
            full.append(
                {"__key__": k, "png": pair.image(d), "txt": pair.caption(d), "wav": wav, "json": meta}
            )
            emergent += [
                {"__key__": f"{k}_speech", "txt": pair.caption(d), "wav": wav, "json": meta},
                {"__key__": f"{k}_image", "png": pair.image(d), "txt": pair.caption(d), "json": {"label": d}},
            ]
    return full, emergent


def trimodal(found: list, pair: Pairer, *, heldout: bool, rng: np.random.Generator | None = None) -> list:
    return [
        {"__key__": path.stem, "png": pair.image(d, heldout=heldout, rng=rng), "txt": pair.caption(d, rng),
         "wav": path.read_bytes(), "json": {"label": d, "speaker": speaker, "file": path.name}}
        for path, d, speaker in found
    ]  # fmt: skip


def build(
    root: Path, out: Path, *, holdout: str, leave_out: tuple[str, ...] = (), seed: int, copies: int
) -> dict:
    """Write the folders listed in the module docstring under ``out``; reused when a build with the same
    parameters is there. Returns the sample count of each folder."""
    from data_pipelines import write_shards
    from data_pipelines.demo import CLASSES

    params = {"format": FORMAT_VERSION, "holdout": holdout, "leave_out": sorted(leave_out), "seed": seed,
              "copies": copies}  # fmt: skip
    marker = out / "DONE.json"
    if marker.is_file() and json.loads(marker.read_text())["params"] == params:
        return json.loads(marker.read_text())["counts"]
    found = recordings(root)
    known = sorted({s for _, _, s in found})
    for name in (holdout, *leave_out):
        if name not in known:
            raise SystemExit(f"speaker {name!r} is not one of FSDD's speakers {known}")
    rng = np.random.default_rng(seed)
    pair = Pairer(rng)
    training = [r for r in found if r[2] != holdout and r[2] not in leave_out]
    splits = {"heldout": trimodal([r for r in found if r[2] == holdout], pair, heldout=True)}
    splits["full"], splits["emergent"] = pair_training(training, pair, copies)
    # its own random stream, so the training splits are the same as without it
    splits["train_speakers"] = trimodal(
        training[::5], pair, heldout=False, rng=np.random.default_rng([seed, 1])
    )
    counts = {}
    for name, samples in splits.items():
        order = rng.permutation(len(samples))  # shuffled: neighbours in a shard are not one speaker's run
        folder = out / name
        for stale in folder.glob("shard-*.tar"):
            stale.unlink()
        counts[name] = write_shards((samples[i] for i in order), folder, max_count=1000)["total"]
    (out / "classes.json").write_text(json.dumps(list(CLASSES)) + "\n")
    marker.write_text(json.dumps({"params": params, "counts": counts}, indent=1) + "\n")
    return counts
