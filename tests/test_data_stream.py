"""The WebDataset loader over shards written in tmp_path: eval reads everything once, train is seeded."""

import itertools
import json

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from data_pipelines import (
    AudioSpec,
    ImageSpec,
    StreamConfig,
    build_loader,
    iter_samples,
    synthetic_samples,
    write_shards,
)

AUDIO = AudioSpec(sample_rate=8000, clip_samples=2000, n_fft=256, hop_length=64, n_mels=16)  # 32 frames
CONTEXT = 16
N_SAMPLES, PER_SHARD = 40, 10


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer(context_length=CONTEXT)  # open_clip's BPE vocab ships in the wheel


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    return write_shards(synthetic_samples(N_SAMPLES, seed=3), out, max_count=PER_SHARD)["pattern"]


@pytest.fixture(scope="module")
def labels(shards):
    return {s["__key__"]: json.loads(s["json"])["label"] for s in iter_samples(shards)}


def config(shards, **overrides) -> StreamConfig:
    base = dict(shards=shards, batch_size=8, image=ImageSpec(size=16), audio=AUDIO, shuffle_buffer=20)
    return StreamConfig(**{**base, **overrides})


def keys_of(loader, n_batches: int | None = None) -> list[str]:
    batches = loader if n_batches is None else itertools.islice(loader, n_batches)
    return [key for batch in batches for key in batch["__key__"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_reads_every_sample_once_with_exact_shapes(shards, labels, tokenizer, num_workers):
    batches = list(
        build_loader(config(shards, train=False, num_workers=num_workers, batch_size=7), tokenizer=tokenizer)
    )
    keys = [k for b in batches for k in b["__key__"]]
    assert sorted(keys) == sorted(labels) and len(keys) == N_SAMPLES
    if num_workers == 0:
        assert keys == list(labels)  # in shard order, no shuffle
        assert [len(b["__key__"]) for b in batches] == [7] * 5 + [5]  # partial last batch kept
    for b in batches:
        n = len(b["__key__"])
        assert b["image"].shape == (n, 3, 16, 16) and b["image"].dtype == torch.float32
        assert b["text"].shape == (n, CONTEXT) and b["text"].dtype == torch.long
        assert b["audio"].shape == (n, AUDIO.n_mels, AUDIO.n_frames) and b["audio"].dtype == torch.float32
        assert b["label"].dtype == torch.long and b["label"].tolist() == [labels[k] for k in b["__key__"]]
        assert set(b["present"]) == {"image", "text", "audio"}
        assert all(mask.dtype == torch.bool and mask.all() for mask in b["present"].values())


def test_eval_ranks_split_the_shards_without_a_process_group(shards, labels, tokenizer):
    per_rank = [
        keys_of(
            build_loader(
                config(shards, train=False, num_workers=0), tokenizer=tokenizer, rank=r, world_size=2
            )
        )
        for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(labels)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_is_reproducible_from_the_seed(shards, tokenizer, num_workers):
    def first_keys(seed: int) -> list[str]:
        loader = build_loader(config(shards, num_workers=num_workers, seed=seed), tokenizer=tokenizer)
        batches = list(itertools.islice(loader, 6))  # more than the 40 samples: resampled, never ends
        assert all(b["image"].shape == (8, 3, 16, 16) and b["audio"].shape == (8, 16, 32) for b in batches)
        assert all(b["text"].shape == (8, CONTEXT) for b in batches)
        return [k for b in batches for k in b["__key__"]]

    first = first_keys(0)
    assert first_keys(0) == first
    assert first_keys(1) != first


def test_train_ranks_draw_different_sequences(shards, tokenizer):
    per_rank = [
        keys_of(build_loader(config(shards, num_workers=0), tokenizer=tokenizer, rank=r, world_size=2), 3)
        for r in range(2)
    ]
    assert per_rank[0] != per_rank[1]


def test_modalities_not_configured_are_not_loaded(shards):
    batch = next(iter(build_loader(config(shards, train=False, num_workers=0, audio=None, text=False))))
    assert set(batch) == {
        "__key__",
        "__url__",
        "label",
        "label_name",
        "image",
        "present",
        "__skipped__",
        "__bad__",
    }
    assert set(batch["present"]) == {"image"} and batch["__skipped__"] == {} and batch["__bad__"] == []


def test_missing_modalities_get_zero_rows_and_false_masks(tmp_path, tokenizer):
    drop = {"wav": 0.5, "txt": 0.3}
    pattern = write_shards(synthetic_samples(24, seed=5, drop=drop), tmp_path, max_count=10)["pattern"]
    raw = {s["__key__"]: s for s in iter_samples(pattern)}
    batches = list(build_loader(config(pattern, train=False, num_workers=0), tokenizer=tokenizer))
    seen_missing = 0
    for b in batches:
        for i, key in enumerate(b["__key__"]):
            for modality, ext in (("audio", "wav"), ("text", "txt"), ("image", "png")):
                present = ext in raw[key]
                assert bool(b["present"][modality][i]) == present
                if not present:
                    seen_missing += 1
                    assert b[modality][i].abs().sum() == 0
    assert seen_missing > 0


def test_undecodable_image_is_skipped_and_reported_with_shard_and_key(tmp_path, tokenizer):
    samples = list(synthetic_samples(3))
    samples[1]["png"] = b"not a png"
    pattern = write_shards(samples, tmp_path)["pattern"]
    loader = build_loader(config(pattern, train=False, num_workers=0), tokenizer=tokenizer)
    batches = list(loader)
    assert [k for b in batches for k in b["__key__"]] == ["syn_000000", "syn_000002"]
    assert batches[0]["__skipped__"] == {"bad_image": 1}
    (record,) = batches[0]["__bad__"]
    assert record["kind"] == "bad_image" and record["key"] == "syn_000001"
    assert record["shard"].endswith("shard-000000.tar") and "UnidentifiedImageError" in record["reason"]
    assert loader.bad_data.counts == {"bad_image": 1}


def test_text_needs_a_tokenizer(shards):
    with pytest.raises(ValueError, match="tokenizer"):
        build_loader(config(shards))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_reads_every_source_once_with_its_own_layout(tmp_path, tokenizer, num_workers):
    from data_pipelines import clap_samples, img2dataset_samples

    images = write_shards(img2dataset_samples(7), tmp_path / "i", max_count=3)["pattern"]
    sounds = write_shards(clap_samples(5, sample_rate=8000), tmp_path / "a", max_count=3)["pattern"]
    cfg = config(
        "", sources=[(images, 1, "img2dataset"), (sounds, 5, "clap")], train=False, num_workers=num_workers
    )
    batches = list(build_loader(cfg, tokenizer=tokenizer, rank=1, world_size=2)) + list(
        build_loader(cfg, tokenizer=tokenizer, rank=0, world_size=2)
    )
    keys = sorted(k for b in batches for k in b["__key__"])
    assert keys == sorted([f"i2d{i:09d}" for i in range(7)] + [f"clap_{i:06d}" for i in range(5)])
    for b in batches:
        is_image = torch.tensor([k.startswith("i2d") for k in b["__key__"]])
        assert torch.equal(b["present"]["image"], is_image) and torch.equal(b["present"]["audio"], ~is_image)
