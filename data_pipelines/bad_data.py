"""Bad data: what kinds there are, how a worker records them, and how the trainer totals and reports them.

A bad sample or shard never stops a run: the worker skips it and records (kind, shard, key, reason).
A bad label (KEPT_KINDS) does not even skip the sample: it is recorded, and the sample goes on without
its label. Only a long run of bad samples in a row stops a training stream (`BadDataError`).
Records travel to the training process inside the next batch the worker yields, under two keys:

    batch["__skipped__"]  {kind: int}   what this worker skipped since its previous batch (exact counts)
    batch["__bad__"]      [{"kind", "shard", "key", "reason"}, ...]   the first few of those, in order

so a prefetched batch the trainer never consumed reports nothing. `BadDataTally` sums them in the
training process and logs each record at WARNING on the "data_pipelines" logger: at most
`lines_per_kind` lines per kind, then one line saying the rest of that kind is only counted.
"""

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("data_pipelines")

# Every kind, in the order summaries list them.
BAD_KINDS = (
    "unreadable_shard",  # cannot be opened, or is not a tar
    "truncated_tar",  # ends early: the samples before the damage are used
    "duplicate_file",  # two files with the same key and extension in a row
    "no_modality",  # none of the configured modalities' files (per the source's layout)
    "bad_image",  # undecodable image
    "bad_audio",  # undecodable audio, or no samples
    "bad_text",  # caption not UTF-8, or a JSON caption that is not a string or list of strings
    "empty_caption",  # caption empty after stripping
    "bad_json",  # JSON that does not parse or is not an object, when a modality is read from it
    "bad_shape",  # a tensor whose shape or dtype after transforms differs from the configured one
    "bad_label",  # a label neither a class id nor a name (or unparseable JSON): kept, without it
)
KEPT_KINDS = ("bad_label",)  # recorded, but the sample is used (without its label)
RECORDS_PER_BATCH = 32  # per batch, records beyond this are only counted


class BadDataError(RuntimeError):
    """A stream cannot go on (e.g. too many bad samples in a row); the message is one line for the user."""


class BadSample(ValueError):
    """Raised by decoding: `kind` is one of BAD_KINDS; the message names the shard and the key."""

    def __init__(self, kind: str, url: str | None, key: str | None, reason: str) -> None:
        assert kind in BAD_KINDS, kind
        super().__init__(f"{kind}: sample {key!r} of shard {url}: {reason}")
        self.kind, self.url, self.key, self.reason = kind, url, key, reason

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "shard": self.url, "key": self.key, "reason": self.reason}


@dataclass
class BadDataLog:
    """A worker's records since its last batch; `take()` empties it into a batch's two keys."""

    counts: dict[str, int]
    records: list[dict[str, Any]]

    @classmethod
    def empty(cls) -> "BadDataLog":
        return cls(counts={}, records=[])

    def add(self, record: Mapping[str, Any]) -> None:
        self.counts[record["kind"]] = self.counts.get(record["kind"], 0) + 1
        if len(self.records) < RECORDS_PER_BATCH:
            self.records.append(dict(record))

    def take(self) -> dict[str, Any]:
        out = {"__skipped__": self.counts, "__bad__": self.records}
        self.counts, self.records = {}, []
        return out


def format_record(record: Mapping[str, Any]) -> str:
    what = f"sample {record['key']!r}" if record.get("key") else "a sample"
    if record["kind"] in KEPT_KINDS:
        return f"kept {what} of {record['shard']} without its label: {record['kind']}: {record['reason']}"
    if record["kind"] in ("unreadable_shard", "truncated_tar"):
        what = f"the rest of the shard after sample {record['key']!r}" if record.get("key") else "the shard"
    return f"skipped {what} of {record['shard']}: {record['kind']}: {record['reason']}"


class BadStreak:
    """Bad samples in a row, by kind, with the first record of each kind: what a stream that gives up
    names (the most frequent kind and one of its samples)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, tuple[dict[str, Any], Any]] = {}  # kind -> (record, origin)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def add(self, record: Mapping[str, Any], origin: Any = None) -> None:
        """Count `record`; `origin` (what the caller needs to look at the sample again) is kept with the
        first record of each kind."""
        self.counts[record["kind"]] += 1
        self.examples.setdefault(record["kind"], (dict(record), origin))

    def clear(self) -> None:
        self.counts.clear()
        self.examples.clear()

    def most_common(self) -> tuple[dict[str, Any], Any]:
        """(record, origin) of the first sample of the most frequent kind (the earliest kind on a tie)."""
        return self.examples[self.counts.most_common(1)[0][0]]

    def message(self, hint: str = "") -> str:
        """One line: how many, the most frequent kind, one of its samples, and `hint` (a likely fix)."""
        example, _ = self.most_common()
        kinds = ", ".join(f"{n} {kind}" for kind, n in self.counts.most_common())
        line = (
            f"{len(self)} bad samples in a row ({kinds}), e.g. sample {example['key']!r} of "
            f"{example['shard']}: {example['reason']}"
        )
        return " ".join(f"{line}{f'; {hint}' if hint else ''}".split())


class BadDataTally:
    """Totals of bad data seen by the batches a training process consumed, with rate-limited logging."""

    def __init__(self, *, lines_per_kind: int = 5, counts: Mapping[str, int] | None = None) -> None:
        self.lines_per_kind = lines_per_kind
        self.counts: dict[str, int] = {k: int(v) for k, v in (counts or {}).items() if v}
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self._logged: dict[str, int] = {}

    def update(self, batch: Mapping[str, Any]) -> None:
        """Add a consumed batch's `__skipped__` counts and log its `__bad__` records."""
        for kind, n in batch.get("__skipped__", {}).items():
            self.counts[kind] = self.counts.get(kind, 0) + int(n)
        for record in batch.get("__bad__", []):
            kind = record["kind"]
            examples = self.examples.setdefault(kind, [])
            if len(examples) < self.lines_per_kind:
                examples.append(dict(record))
            logged = self._logged.get(kind, 0)
            if logged < self.lines_per_kind:
                logger.warning("%s", format_record(record))
            elif logged == self.lines_per_kind:
                logger.warning("further %s samples are counted but not logged one by one", kind)
            self._logged[kind] = logged + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def ordered_counts(self) -> dict[str, int]:
        """Non-zero counts in BAD_KINDS order (for a training log line or metrics)."""
        return {k: self.counts[k] for k in BAD_KINDS if self.counts.get(k)}

    def summary(self) -> dict[str, Any]:
        """{"total", "counts" {kind: n}, "examples" {kind: [record, ...]}} for a final summary."""
        return {"total": self.total, "counts": self.ordered_counts(), "examples": self.examples}

    def format(self) -> str:
        """One line: "bad data skipped: 3 bad_image, 1 truncated_tar", then "2 bad_label kept without
        their label" when there are such, or "no bad data"."""
        counts = self.ordered_counts()
        if not counts:
            return "no bad data"
        skipped = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind not in KEPT_KINDS)
        kept = ", ".join(f"{n} {kind}" for kind, n in counts.items() if kind in KEPT_KINDS)
        parts = [f"bad data skipped: {skipped}"] if skipped else []
        if kept:
            parts.append(f"{'' if skipped else 'bad data: '}{kept} kept without their label")
        return "; ".join(parts)
