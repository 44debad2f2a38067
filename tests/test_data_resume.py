"""Exact resume of training (resampled, infinite) streams, simulating ranks with rank=/world_size=.

The reference is always an uninterrupted loader: a run stopped after k batches and resumed from the
saved state must hand out exactly the samples (keys and tensors) the uninterrupted run does next.
"""

import itertools
import json
import logging

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from data_pipelines import (
    AudioSpec,
    ImageAugment,
    ImageSpec,
    StreamConfig,
    build_loader,
    clap_samples,
    combine_states,
    img2dataset_samples,
    synthetic_samples,
    write_shards,
)

AUDIO = AudioSpec(sample_rate=8000, clip_samples=1200, n_fft=128, hop_length=64, n_mels=8)


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer(context_length=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    samples = list(synthetic_samples(36, seed=3, image_size=8, seconds=(0.1, 0.3)))
    for i in range(2, 36, 6):
        samples[i]["png"] = b"broken"  # bad samples must not shift anything on resume either
    written = write_shards(samples, tmp_path_factory.mktemp("resume"), max_count=5)
    for name in ("shard-000001.tar", "shard-000005.tar"):  # damaged shards are found again on resume
        path = f"{written['out_dir']}/{name}"
        with open(path, "r+b") as f:
            f.truncate(written["bytes"][name] // 2)
    return written["pattern"]


def config(shards, **overrides) -> StreamConfig:
    base = dict(
        shards=shards,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=6,
        shards_per_round=2,  # rounds of ~10 samples: a few batches cross round boundaries
        image=ImageSpec(
            size=8, augment=ImageAugment(scale=(0.5, 1.0), flip=0.5, color_jitter=(0.3, 0, 0, 0))
        ),
        audio=AUDIO,
        seed=1,
    )
    return StreamConfig(**{**base, **overrides})


def take(loader, n: int) -> list[dict]:
    return list(itertools.islice(loader, n))


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def run_in_pieces(cfg, tokenizer, world_size: int, pieces: list[int]) -> list[list[dict]]:
    """Every rank consumes pieces[0] batches, the states are combined (as rank 0 would save them), new
    loaders resume from them, and so on. Returns, per rank, every batch consumed."""
    consumed: list[list[dict]] = [[] for _ in range(world_size)]
    state = None
    for n in pieces:
        loaders = [
            build_loader(cfg, tokenizer=tokenizer, rank=r, world_size=world_size, resume=state)
            for r in range(world_size)
        ]
        for r, loader in enumerate(loaders):
            consumed[r] += take(loader, n)
        state = json.loads(json.dumps(combine_states([ld.state_dict() for ld in reversed(loaders)])))
    return consumed


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_run_consumes_exactly_what_an_uninterrupted_run_does(
    shards, tokenizer, world_size, num_workers
):
    cfg = config(shards, num_workers=num_workers)
    # k = 3 is odd: with 2 workers the resumed loader must start with the second worker's stream
    resumed = run_in_pieces(cfg, tokenizer, world_size, [3, 5])
    for rank in range(world_size):
        straight = take(build_loader(cfg, tokenizer=tokenizer, rank=rank, world_size=world_size), 8)
        assert keys(resumed[rank]) == keys(straight)
        for a, b in zip(resumed[rank], straight, strict=True):
            for name in ("image", "text", "audio", "label"):
                assert torch.equal(a[name], b[name]), name  # random crops, flips, jitter are replayed too
            assert a["__skipped__"] == b["__skipped__"]  # the bad sample is counted once, in its batch
    if world_size == 2:
        assert keys(resumed[0]) != keys(resumed[1])
    skipped = [b["__skipped__"] for r in resumed for b in r]
    assert sum(s.get("bad_image", 0) for s in skipped) and sum(s.get("truncated_tar", 0) for s in skipped)


def test_resuming_from_a_fresh_state_would_repeat_data(shards, tokenizer):
    """The control for the test above: without the state, the 'resumed' loader starts over."""
    first = take(build_loader(config(shards), tokenizer=tokenizer), 3)
    again = take(build_loader(config(shards), tokenizer=tokenizer), 5)
    straight = take(build_loader(config(shards), tokenizer=tokenizer), 8)
    assert keys(first + again) != keys(straight) and keys(again)[:4] == keys(first)[:4]


def test_several_resumes_and_a_new_batch_size_stay_exact(shards, tokenizer):
    cfg = config(shards, num_workers=0)
    resumed = run_in_pieces(cfg, tokenizer, 1, [2, 1, 3])
    straight = take(build_loader(cfg, tokenizer=tokenizer), 6)
    assert keys(resumed[0]) == keys(straight)

    # the position counts samples, not batches: a new batch size continues the same sample sequence
    first = build_loader(cfg, tokenizer=tokenizer)
    head = take(first, 2)
    bigger = build_loader(config(shards, batch_size=6), tokenizer=tokenizer, resume=first.state_dict())
    assert keys(head + take(bigger, 2)) == keys(straight)[:20]


def test_mixed_sources_resume_exactly_and_follow_their_weights(tmp_path, tokenizer):
    images = write_shards(img2dataset_samples(30, image_size=8), tmp_path / "i2d", max_count=6)["pattern"]
    audio = write_shards(clap_samples(30, sample_rate=16000), tmp_path / "clap", max_count=6)["pattern"]
    cfg = config(
        "",
        num_workers=2,
        sources=[(images, 3.0, "img2dataset"), (audio, 1.0, "clap")],
    )
    resumed = run_in_pieces(cfg, tokenizer, 1, [5, 6])[0]
    straight = take(build_loader(cfg, tokenizer=tokenizer), 11)
    assert keys(resumed) == keys(straight)
    for a, b in zip(resumed, straight, strict=True):
        assert torch.equal(a["text"], b["text"])  # CLAP caption picks are replayed too
        assert torch.equal(a["present"]["audio"], b["present"]["audio"])
    from_images = sum(k.startswith("i2d") for k in keys(straight))
    assert 0.6 < from_images / len(keys(straight)) < 0.9  # weight 3:1
    for batch in straight:  # image-text and audio-text samples share batches, masks say which is which
        is_image = torch.tensor([k.startswith("i2d") for k in batch["__key__"]])
        assert torch.equal(batch["present"]["image"], is_image)
        assert torch.equal(batch["present"]["audio"], ~is_image) and batch["present"]["text"].all()


@pytest.mark.parametrize(
    "change, exact",
    [
        ({"num_workers": 1}, True),  # 0 -> 1 workers: the same single stream
        ({"num_workers": 2}, False),
        ({"seed": 2}, False),
        ({"world_size": 2}, False),
    ],
)
def test_changed_layout_on_resume_reseeds_with_a_warning(shards, tokenizer, caplog, change, exact):
    cfg = config(shards, num_workers=0)
    first = build_loader(cfg, tokenizer=tokenizer)
    head = take(first, 2)
    state = first.state_dict()
    world_size = change.pop("world_size", 1)
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        resumed = build_loader(
            config(shards, **change), tokenizer=tokenizer, world_size=world_size, resume=state
        )
        carried = resumed.state_dict()["bad_counts"]
        tail = take(resumed, 2)
    straight = keys(take(build_loader(cfg, tokenizer=tokenizer), 4))
    warned = [
        r.getMessage() for r in caplog.records if "cannot continue the data streams exactly" in r.getMessage()
    ]
    if exact:
        assert not warned and keys(head + tail) == straight
    else:
        assert len(warned) == 1 and "generation 1" in warned[0]
        assert resumed.state_dict()["generation"] == 1 and keys(head + tail) != straight
    assert carried == state["bad_counts"] and state["bad_counts"]  # the bad-data totals carry over


def test_state_errors_are_clear(shards, tokenizer):
    loaders = [build_loader(config(shards), tokenizer=tokenizer, rank=r, world_size=2) for r in range(2)]
    with pytest.raises(ValueError, match=r"one state per rank 0\.\.1, got ranks \[0\]"):
        combine_states([loaders[0].state_dict()])
    with pytest.raises(ValueError, match="resume is for training loaders"):
        build_loader(config(shards, train=False), tokenizer=tokenizer, resume=loaders[0].state_dict())


def test_iterating_a_training_loader_again_continues_it(shards, tokenizer):
    loader = build_loader(config(shards, num_workers=2), tokenizer=tokenizer)
    pieces = take(loader, 1) + take(loader, 2) + take(loader, 2)
    assert keys(pieces) == keys(take(build_loader(config(shards, num_workers=2), tokenizer=tokenizer), 5))
    assert loader.state_dict()["streams"][0]["batches"] == 3 and loader.state_dict()["next_stream"] == 1
