"""The sample stream: shards -> samples -> decoded tensors -> batches, as an explicit list of stages.

Training, for rank r and logical stream w (one per loader worker); every random choice is seeded from
(seed, generation, r, w, purpose, ...), never from the process, the clock or the order of events:
    1. rounds    per source, round k draws `shards_per_round` of its shards at random, with replacement
    2. scan      tar headers -> sample references (bytes not read yet); damaged shards are recorded.
                 Remote shards (pipe:, http, s3 ...) are scanned while read: their references hold the
                 bytes, and a stream that fails mid-shard is retried `retries` times from where it was
    3. shuffle   per source and round, a buffer of `shuffle_buffer` references, emptied at the round's end
    4. mix       per sample, the source to take it from, by weight
    5. load      the sample's bytes
    6. decode    layout -> tensors; random crops / caption picks seeded by the sample's index in the stream;
                 bad samples recorded and skipped
    7. batch     collate (presence masks) + "__position__", "__skipped__", "__bad__"
Steps 1-4 touch no file contents of local shards, so resuming (see position.py) replays them cheaply;
for remote shards the replay streams the round's shards again up to the position, decoding nothing.

Evaluation reads every shard of every source once, in order: rank r takes shards r, r + R, ..., and its
worker w of those every W-th from w (no process group needed); steps 2, 5, 6, 7. Ranks may see
different sample counts; each worker ends on its own partial batch.
"""

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from data_pipelines.bad_data import BadDataError, BadDataLog, BadDataTally, BadSample, BadStreak
from data_pipelines.collate import collate
from data_pipelines.config import StreamConfig
from data_pipelines.decode import check_layout, decode_sample, layout_hint, templates, wanted_files
from data_pipelines.position import LoaderPosition, restore
from data_pipelines.remote import mask
from data_pipelines.tario import SampleRef, ShardError, expand_shards, scan_shard
from data_pipelines.transforms import Tokenizer

_MIX_CHUNK = 4096  # source choices drawn per seeded chunk


def _seed(*parts: int | str) -> int:
    """A well-mixed 64-bit seed from parts ((1, 0) and (0, 1) do not collide)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def fingerprint(cfg: StreamConfig, urls: list[list[str]]) -> str:
    """What fixes the order of raw samples: seed, shard names per source, shuffle and round sizes.

    Shard file names, not paths, so moving the shards elsewhere keeps a resume exact.
    """
    what = {
        "seed": cfg.seed,
        "shuffle_buffer": cfg.shuffle_buffer,
        "shards_per_round": cfg.shards_per_round,
        "shards": [[os.path.basename(u) for u in source] for source in urls],
    }
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _shuffle(items: Iterator[SampleRef], size: int, rng: random.Random) -> Iterator[SampleRef]:
    """Fill a buffer of `size`, then for each new item yield a random one and put the new one in its place;
    at the end, yield the rest in random order."""
    buffer: list[SampleRef] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class _Dataset(torch.utils.data.IterableDataset):
    """The stages above for one rank; each loader worker runs one logical stream."""

    def __init__(
        self,
        cfg: StreamConfig,
        urls: list[list[str]],
        tokenizer: Tokenizer | None,
        rank: int,
        world_size: int,
        start: LoaderPosition,
    ) -> None:
        super().__init__()
        self.cfg, self.urls, self.tokenizer = cfg, urls, tokenizer
        self.rank, self.world_size, self.start = rank, world_size, start
        self.layouts = [s.layout for s in cfg.source_list()]
        self.wanted = [wanted_files(layout, cfg.modalities()) for layout in self.layouts]
        weights = np.array([s.weight for s in cfg.source_list()], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.templates = templates(cfg, tokenizer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker()
        if not self.cfg.train:
            return self._eval(worker, num_workers)
        assert num_workers == self.start.num_streams, (num_workers, self.start.num_streams)
        return self._train((worker + self.start.next_stream) % num_workers)

    # ------------------------------------------------------------------------------------------ stages

    def _scan(self, url: str, report: Callable[[dict[str, Any]], None]) -> Iterator[SampleRef]:
        try:
            yield from scan_shard(url, retries=self.cfg.retries)
        except ShardError as exn:
            report({"kind": exn.kind, "shard": exn.url, "key": exn.key, "reason": exn.reason})  # masked

    def _rounds(
        self, base: tuple, source: int, round_: int, offset: int, log: BadDataLog
    ) -> Iterator[tuple[SampleRef, list[int]]]:
        """One source's references forever, each with the source position after it: [round, offset]."""
        urls, empty_rounds = self.urls[source], 0
        while True:
            chosen = random.Random(_seed(*base, "round", source, round_)).choices(
                urls, k=self.cfg.shards_per_round
            )
            # Damage found while re-reading what the trainer already consumed was reported then.
            quiet = [offset > 0]

            def report(record: dict[str, Any], quiet: list[bool] = quiet) -> None:
                if not quiet[0]:
                    log.add(record)

            refs = (r for url in chosen for r in self._scan(url, report))
            shuffle_rng = random.Random(_seed(*base, "shuffle", source, round_))
            taken = 0
            for ref in _shuffle(refs, max(1, self.cfg.shuffle_buffer), shuffle_rng):
                taken += 1
                if taken <= offset:
                    quiet[0] = taken < offset
                    continue
                yield ref, [round_, taken]
            empty_rounds = 0 if taken else empty_rounds + 1
            if empty_rounds >= 20:
                raise BadDataError(
                    mask(
                        f"source {source} ({self.cfg.source_list()[source].shards!r}): 20 rounds in a row "
                        f"found no readable sample (last shards drawn: {chosen})"
                    )
                )
            round_, offset = round_ + 1, 0

    def _decode(
        self, ref: SampleRef, source: int, seed: int | None, log: BadDataLog, streak: BadStreak | None = None
    ) -> dict[str, Any] | None:
        try:
            if ref.problem:
                raise BadSample("duplicate_file", ref.url, ref.key, ref.problem)
            try:
                raw = ref.load(self.wanted[source])
            except OSError as exn:
                raise ShardError(
                    "unreadable_shard", ref.url, ref.key, f"{type(exn).__name__}: {exn}"
                ) from exn
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            sample = decode_sample(
                raw,
                self.cfg,
                layout=self.layouts[source],
                tokenizer=self.tokenizer,
                generator=generator,
                templates=self.templates,
            )
        except (BadSample, ShardError) as exn:
            record = {"kind": exn.kind, "shard": exn.url, "key": exn.key, "reason": exn.reason}
            log.add(record)
            if streak is not None:
                streak.add(record, (ref, source))
            return None
        for record in sample.pop("__bad__", ()):  # kept: a bad label only
            log.add(record)
        return sample

    def _give_up(self, streak: BadStreak) -> str:
        """The one-line error of a stream that met `max_bad_in_a_row` bad samples in a row, with a likely
        fix read off an example of the most frequent kind."""
        ref, source = streak.most_common()[1]
        try:
            raw = ref.load()
        except OSError:
            return streak.message()
        # the setting's name as mmssl spells it: the one user of this message
        setting = "data.layout" if len(self.urls) == 1 else f"data.sources[{source}].layout"
        return streak.message(layout_hint(raw, self.cfg.modalities(), self.layouts[source], setting))

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples, templates=self.templates, trim_text=self.cfg.trim_text)

    def _train(self, stream: int) -> Iterator[dict[str, Any]]:
        """The training batches of one logical stream; when it cannot go on, a last batch holding only
        "__error__" (a one-line message) and the bad-data records, which StreamLoader raises as
        BadDataError in the training process (a worker's own exception would reach it as a traceback)."""
        log = BadDataLog.empty()
        try:
            yield from self._train_batches(stream, log)
        except BadDataError as exn:
            yield {"__error__": str(exn), **log.take()}

    def _train_batches(self, stream: int, log: BadDataLog) -> Iterator[dict[str, Any]]:
        cfg, generation = self.cfg, self.start.generation
        base = (cfg.seed, generation, self.rank, stream)
        saved = self.start.streams[stream] or {}
        n, batches = saved.get("n", 0), saved.get("batches", 0)
        positions = [list(p) for p in saved.get("sources", [[0, 0]] * len(self.urls))]
        readers = [self._rounds(base, s, *positions[s], log) for s in range(len(self.urls))]
        choices, chunk = np.zeros(0, dtype=np.int64), -1
        samples: list[dict[str, Any]] = []
        streak = BadStreak()
        while True:
            if len(self.urls) > 1 and n // _MIX_CHUNK != chunk:
                chunk = n // _MIX_CHUNK
                mix_rng = np.random.default_rng(_seed(*base, "mix", chunk))
                choices = mix_rng.choice(len(self.urls), size=_MIX_CHUNK, p=self.weights)
            source = int(choices[n % _MIX_CHUNK]) if len(self.urls) > 1 else 0
            ref, positions[source] = next(readers[source])
            sample = self._decode(ref, source, _seed(*base, "sample", n), log, streak)
            n += 1
            if sample is None:
                if len(streak) >= cfg.max_bad_in_a_row:
                    raise BadDataError(mask(self._give_up(streak)))
                continue
            streak.clear()
            samples.append(sample)
            if len(samples) == cfg.batch_size:
                batches += 1
                batch = self._collate(samples)
                batch["__position__"] = {
                    "generation": generation,
                    "stream": stream,
                    "n": n,
                    "sources": [list(p) for p in positions],
                    "batches": batches,
                }
                batch.update(log.take())
                yield batch
                samples = []

    def _eval(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        pairs = [(s, url) for s, urls in enumerate(self.urls) for url in urls]
        mine = pairs[self.rank :: self.world_size][worker::num_workers]
        log, samples = BadDataLog.empty(), []
        for source, url in mine:
            for ref in self._scan(url, log.add):
                sample = self._decode(ref, source, None, log)
                if sample is None:
                    continue
                samples.append(sample)
                if len(samples) == self.cfg.batch_size:
                    yield {**self._collate(samples), **log.take()}
                    samples = []
        if samples:
            yield {**self._collate(samples), **log.take()}
        if log.counts:  # found after the last sample: StreamLoader takes these and yields nothing
            yield {"__carrier__": True, **log.take()}


@contextlib.contextmanager
def _one_thread(enabled: bool) -> Iterator[None]:
    """Decode in the calling process with one intra-op thread, then restore the count.

    Per-sample ops are tiny: with several threads they run ~1.5x slower on an idle 2-core machine and
    up to 20x slower on a busy one. Loader workers already run with one thread (torch sets it).
    """
    threads = torch.get_num_threads()
    if enabled and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled and threads > 1:
            torch.set_num_threads(threads)


class StreamLoader:
    """Batches for one rank (collate's format plus the keys below), recording what the trainer consumed.

    Extra batch keys: "__skipped__" {kind: count} and "__bad__" [records] (bad_data.py), and in training
    "__position__" (position.py). As batches are handed out, `bad_data` totals them (and logs the
    records) and, in training, `position` records them; `state_dict()` is what a checkpoint saves.
    A training loader is one endless stream (iterating it again continues where the last loop stopped);
    an eval loader reads its shards once per iteration. A training stream that cannot go on (too many
    bad samples in a row, or no readable sample in its shards) raises BadDataError, one line.
    """

    def __init__(self, cfg: StreamConfig, dataset: _Dataset, bad_counts: dict[str, int]) -> None:
        self.cfg, self.position = cfg, dataset.start
        self.bad_data = BadDataTally(counts=bad_counts)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory
        )
        self._batches: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Training: one endless stream, so iterating again continues it. Eval: a new pass each time.
        if not self.cfg.train:
            batches: Iterator[dict[str, Any]] = iter(self.loader)
        else:
            if self._batches is None:
                self._batches = iter(self.loader)
            batches = self._batches
        while True:
            with _one_thread(self.cfg.num_workers == 0):
                batch = next(batches, None)
            if batch is None:
                return
            self.bad_data.update(batch)
            if "__error__" in batch:
                raise BadDataError(batch["__error__"])
            if batch.get("__carrier__"):
                continue
            if self.cfg.train:
                self.position.update(batch)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """This rank's position and bad-data totals (JSON-able); combine ranks with combine_states()."""
        if not self.cfg.train:
            raise ValueError("an eval loader reads its shards once and has no position to save")
        return {**self.position.state_dict(), "bad_counts": dict(self.bad_data.counts)}


def build_loader(
    cfg: StreamConfig,
    *,
    tokenizer: Tokenizer | None = None,
    rank: int = 0,
    world_size: int = 1,
    resume: dict[str, Any] | None = None,
    check: bool = True,
) -> StreamLoader:
    """The loader of one rank. Train mode never ends; eval mode reads its shards once per iteration.

    `resume`: a state saved from earlier loaders (combine_states() of every rank's state_dict()); the
    streams continue at the next sample the trainer had not consumed (position.py says what happens
    when the world size, worker count, seed or shards changed). `check` runs check_layout() first.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if cfg.text and tokenizer is None:
        raise ValueError("StreamConfig.text is True but no tokenizer was given to build_loader")
    if resume is not None and not cfg.train:
        raise ValueError(
            "resume is for training loaders; an eval loader always reads its shards from the start"
        )
    urls = [expand_shards(s.shards) for s in cfg.source_list()]
    if check:
        check_layout(cfg)
    if not cfg.train:
        total = sum(len(u) for u in urls)
        if rank >= total:
            raise ValueError(f"rank {rank} of {world_size} gets no shard: the sources have {total}")
    start, bad_counts = restore(
        resume,
        rank=rank,
        world_size=world_size,
        num_streams=max(1, cfg.num_workers),
        fingerprint=fingerprint(cfg, urls),
    )
    dataset = _Dataset(cfg, urls, tokenizer, rank, world_size, start)
    return StreamLoader(cfg, dataset, bad_counts)
