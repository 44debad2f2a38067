"""Where a training loader is, so that a resumed run continues at the next unseen sample.

Each rank's training loader runs W = max(1, num_workers) logical streams, one per loader worker. Stream w
of rank r is a deterministic function of (seed, generation, r, w) and the shard lists: which shards
each round draws, the shuffle order, the source picked for each sample and every random crop or
caption pick (seeded per sample). A stream's position is

    n        samples it has taken from its sources (good or bad, before decoding)
    sources  per source [round, offset]: the round it is in and the samples taken from that round

Every training batch carries the position of the stream that made it, taken right after its last
sample (`batch["__position__"]`). The loader records it as it hands the batch to the trainer, so the
state covers exactly what the trainer consumed, never what workers prefetched. torch's DataLoader
hands out batches from its workers in strict rotation; the state records which stream comes next and
the resumed loader rotates its workers to match. Restoring a stream rebuilds the round it was in from
its seed, re-reads that round's tar headers (not the file contents) and skips what was consumed.

What happens on resume when things changed:
- batch size, layouts, source weights, modalities, transforms: the position is in samples, so the
  streams continue exactly where they were; later batches are cut or mixed differently.
- num_workers between 0 and 1: the same single stream, so still exact.
- world size, the number of streams (num_workers > 1), the seed, the shard lists, shuffle_buffer or
  shards_per_round: exact continuation is impossible. The loader logs a WARNING saying what changed and
  starts every stream afresh with a new generation number mixed into its seeds: the new streams never
  replay the consumed sequence, but, like any resampled stream, may draw samples seen before.
  The bad-data totals carry over (all of them onto rank 0).
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger("data_pipelines")

FORMAT = "data_pipelines.loader_position/1"


class LoaderPosition:
    """The consumed position of one rank's training loader: per stream, the position of its last batch."""

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        num_streams: int,
        fingerprint: str,
        generation: int = 0,
        next_stream: int = 0,
        streams: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        self.rank, self.world_size, self.num_streams = rank, world_size, num_streams
        self.fingerprint, self.generation, self.next_stream = fingerprint, generation, next_stream
        self.streams: list[dict[str, Any] | None] = [
            None if s is None else dict(s) for s in (streams or [None] * num_streams)
        ]
        assert len(self.streams) == num_streams and 0 <= next_stream < num_streams

    def update(self, batch: Mapping[str, Any]) -> None:
        """Record a batch the trainer has taken."""
        pos = batch["__position__"]
        if pos["generation"] != self.generation or not 0 <= pos["stream"] < self.num_streams:
            raise ValueError(f"batch position {pos} does not belong to this loader")
        self.streams[pos["stream"]] = {k: pos[k] for k in ("n", "sources", "batches")}
        self.next_stream = (pos["stream"] + 1) % self.num_streams

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "generation": self.generation,
            "world_size": self.world_size,
            "num_streams": self.num_streams,
            "rank": self.rank,
            "next_stream": self.next_stream,
            "streams": [
                None if s is None else {**s, "sources": [list(p) for p in s["sources"]]} for s in self.streams
            ],
        }


_SHARED = ("format", "fingerprint", "generation", "world_size", "num_streams")


def combine_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every rank's `loader.state_dict()` (any order) -> one state for the checkpoint."""
    if not states:
        raise ValueError("combine_states needs the state of every rank, got none")
    first = states[0]
    if first.get("format") != FORMAT:
        raise ValueError(f"not a loader state of format {FORMAT}: {str(first)[:200]}")
    for state in states:
        for key in _SHARED:
            if state.get(key) != first[key]:
                raise ValueError(f"rank states disagree on {key}: {state.get(key)!r} vs {first[key]!r}")
    ranks = sorted(states, key=lambda s: s["rank"])
    if [s["rank"] for s in ranks] != list(range(first["world_size"])):
        raise ValueError(
            f"need one state per rank 0..{first['world_size'] - 1}, got ranks {[s['rank'] for s in ranks]}"
        )
    per_rank = [{k: v for k, v in s.items() if k not in _SHARED} for s in ranks]
    return {**{k: first[k] for k in _SHARED}, "ranks": per_rank}


def restore(
    state: Mapping[str, Any] | None,
    *,
    rank: int,
    world_size: int,
    num_streams: int,
    fingerprint: str,
) -> tuple[LoaderPosition, dict[str, int]]:
    """The starting position of this rank's loader and its bad-data totals, from a checkpointed state.

    `state` is combine_states()'s output (or one rank's state_dict() when there is one rank), or None.
    """
    fresh = dict(rank=rank, world_size=world_size, num_streams=num_streams, fingerprint=fingerprint)
    if state is None:
        return LoaderPosition(**fresh), {}
    if "ranks" not in state:
        state = combine_states([state])
    if state.get("format") != FORMAT:
        raise ValueError(f"resume state is not a loader state of format {FORMAT}")
    ranks = state["ranks"]
    changes = [
        f"{name} {state[key]} -> {now}"
        for name, key, now in (
            ("world size", "world_size", world_size),
            ("streams per rank (max(1, num_workers))", "num_streams", num_streams),
        )
        if state[key] != now
    ]
    if state["fingerprint"] != fingerprint:
        changes.append("the seed, shard lists, shuffle_buffer or shards_per_round")
    if not changes:
        mine = ranks[rank]
        position = LoaderPosition(
            **fresh,
            generation=state["generation"],
            next_stream=mine["next_stream"],
            streams=mine["streams"],
        )
        return position, dict(mine.get("bad_counts", {}))

    generation = state["generation"] + 1
    if rank == 0:
        logger.warning(
            "cannot continue the data streams exactly (%s changed since the checkpoint): every stream "
            "restarts with new seeds (generation %d); they do not replay the consumed sequence but, "
            "like any resampled stream, may draw samples seen before",
            "; ".join(changes),
            generation,
        )
    totals: dict[str, int] = {}
    if rank == 0:  # keep the run's bad-data totals, all on rank 0
        for r in ranks:
            for kind, n in r.get("bad_counts", {}).items():
                totals[kind] = totals.get(kind, 0) + int(n)
    return LoaderPosition(**fresh, generation=generation), totals
