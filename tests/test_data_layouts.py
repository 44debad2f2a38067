"""Reading the layouts people already have (img2dataset, LAION-Audio / CLAP, mmssl's own) and explicit ones,
and the start-up check that a layout matches the shards."""

import itertools

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from data_pipelines import (
    AudioSpec,
    ImageSpec,
    Layout,
    StreamConfig,
    build_loader,
    check_layout,
    clap_samples,
    img2dataset_samples,
    parse_layout,
    resolve_layout,
    synthetic_samples,
    write_shards,
)

AUDIO = AudioSpec(sample_rate=16000, clip_samples=3200, n_fft=256, hop_length=160, n_mels=16)  # 21 frames
CONTEXT = 24


@pytest.fixture(scope="module")
def tokenizer():
    return SimpleTokenizer(context_length=CONTEXT)


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    return write_shards(img2dataset_samples(12), tmp_path_factory.mktemp("i2d"), max_count=5)["pattern"]


@pytest.fixture(scope="module")
def clap(tmp_path_factory):
    return write_shards(clap_samples(12, captions=4), tmp_path_factory.mktemp("clap"), max_count=5)["pattern"]


def config(shards, **overrides) -> StreamConfig:
    base = dict(shards=shards, batch_size=4, num_workers=0, image=ImageSpec(size=16), audio=AUDIO)
    return StreamConfig(**{**base, **overrides})


def decoded_captions(batches, tokenizer) -> list[str]:
    texts = torch.cat([b["text"] for b in batches])
    return [tokenizer.decode(t[(t > 0) & (t < 49406)].tolist()).strip() for t in texts]


def test_img2dataset_layout_gives_image_and_text_and_no_audio(i2d, tokenizer):
    batches = list(build_loader(config(i2d, train=False, layout="img2dataset"), tokenizer=tokenizer))
    assert sum(len(b["__key__"]) for b in batches) == 12
    for b in batches:
        assert b["present"]["image"].all() and b["present"]["text"].all() and not b["present"]["audio"].any()
        assert b["audio"].shape == (len(b["__key__"]), 16, 21) and b["audio"].abs().sum() == 0
        assert (b["label"] == -1).all()  # img2dataset's json has metadata, no label
    assert decoded_captions(batches, tokenizer)[0].startswith("a photo of pattern")


def test_clap_layout_picks_a_random_caption_in_training_and_the_first_in_eval(clap, tokenizer):
    evaluated = list(build_loader(config(clap, train=False, layout="clap", image=None), tokenizer=tokenizer))
    assert all(b["present"]["audio"].all() and b["present"]["text"].all() for b in evaluated)
    assert all(c.startswith("caption 0 of clip") for c in decoded_captions(evaluated, tokenizer))

    def train_captions(seed: int) -> list[str]:
        loader = build_loader(config(clap, layout="clap", image=None, seed=seed), tokenizer=tokenizer)
        return decoded_captions(list(itertools.islice(loader, 6)), tokenizer)

    picked = train_captions(0)
    assert {c.split()[1] for c in picked} == {"0", "1", "2", "3"}  # every caption index gets picked
    assert train_captions(0) == picked  # seeded


def test_explicit_layout_from_a_string(tmp_path, tokenizer):
    samples = [
        {"__key__": f"k{i}", "webp": s["png"], "json": {"caption": f"custom {i}", "class": i % 3}}
        for i, s in enumerate(synthetic_samples(5, image_format="png"))
    ]
    pattern = write_shards(samples, tmp_path)["pattern"]
    layout = "image=webp;text=json:caption;label=json:class"
    batch = next(
        iter(build_loader(config(pattern, train=False, layout=layout, audio=None), tokenizer=tokenizer))
    )
    assert batch["present"]["image"].all() and batch["label"].tolist() == [0, 1, 2, 0]
    assert decoded_captions([batch], tokenizer)[:2] == ["custom 0", "custom 1"]
    assert parse_layout(layout) == Layout(
        name=layout, image=("webp",), text=("json:caption",), label=("json:class",)
    )


def test_mmssl_layout_reads_its_own_shards_and_json_caption_lists(tmp_path, tokenizer):
    samples = list(synthetic_samples(4, audio_format="flac", image_format="jpg"))
    del samples[0]["txt"]
    samples[0]["json"]["text"] = ["from the json list"]
    pattern = write_shards(samples, tmp_path)["pattern"]
    batch = next(iter(build_loader(config(pattern, train=False), tokenizer=tokenizer)))
    assert all(mask.all() for mask in batch["present"].values())
    assert decoded_captions([batch], tokenizer)[0] == "from the json list"
    assert batch["label"].tolist() == [s["json"]["label"] for s in samples]


def test_a_layout_that_matches_nothing_is_a_start_up_error(i2d, clap, tokenizer):
    with pytest.raises(
        ValueError,
        match=r"layout 'clap' .* whose files are \['jpg', 'json', 'txt'\]; layout 'mmssl' or 'img2dataset' would match",
    ):
        build_loader(config(i2d, layout="clap", image=None), tokenizer=tokenizer)
    with pytest.raises(
        ValueError, match=r"source 1 .*layout 'img2dataset'.*\['flac', 'json'\].*'clap' would match"
    ):
        check_layout(config("", sources=[(i2d, 1, "img2dataset"), (clap, 1, "img2dataset")]))
    report = check_layout(config("", sources=[(i2d, 1, "img2dataset"), (clap, 1, "clap")]))
    assert report[0]["matched"] == {"image": 5, "text": 5, "audio": 0}
    assert report[1]["matched"] == {"image": 0, "text": 5, "audio": 5}


def test_a_layout_for_none_of_the_configured_modalities_is_refused(i2d):
    with pytest.raises(
        ValueError, match=r"layout 'clap' .*feeds none of the configured modalities \('image',\)"
    ):
        config(i2d, layout="clap", audio=None, text=False)


def test_a_shard_list_that_matches_nothing_is_a_start_up_error(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match=r"no shard file matches .*nothing-\*\.tar"):
        build_loader(config(str(tmp_path / "nothing-*.tar")), tokenizer=tokenizer)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("laion", "unknown layout 'laion'"),
        ("image=jpg;smell=txt", "unknown modality 'smell'"),
        ("image=json:url", "only text and label can come from a JSON field"),
        ("text=json:", "bad text entry 'json:'"),
    ],
)
def test_bad_layout_strings_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layout(spec)


def test_layout_from_a_mapping_as_a_json_config_gives_it():
    layout = resolve_layout({"name": "mine", "image": ["jpg"], "text": ["TXT", "json:caption"]})
    assert layout == Layout(name="mine", image=("jpg",), text=("txt", "json:caption"))
