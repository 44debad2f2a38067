"""Data sets as they come: labels that are class names (or broken), layouts that carry over from training
to evaluation, and a stream that gives up saying why. Shards are built in tmp_path; evaluation runs in
this process on a randomly initialised tiny model (an export folder when `mmssl eval` is exercised)."""

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data_pipelines import (
    BadDataError,
    ImageSpec,
    StreamConfig,
    build_loader,
    clap_samples,
    format_verify_report,
    img2dataset_samples,
    read_label,
    resolve_layout,
    synthetic_samples,
    verify_exit_code,
    verify_shards,
    write_shards,
)
from mmssl import data
from mmssl.checkpoint import contiguous_copy
from mmssl.cli import main
from mmssl.config import SourceConfig, apply_overrides, save_json
from mmssl.eval import labels
from mmssl.eval.embeddings import Embeddings, embed_split
from mmssl.eval.run import EvalPlan, run_eval
from mmssl.model import MultimodalModel
from mmssl.presets import tiny
from mmssl.tokenizer import ClipTokenizer

NAMES = ["zebra", "owl", "ant", "moth", "eel", "yak", "bee", "cod", "fox", "gnu"]  # by synthetic label
CPU = torch.device("cpu")


def with_labels(samples, label_of):
    """Samples whose json "label" is replaced by label_of(index, sample) (None: no label)."""
    for i, s in enumerate(samples):
        meta = dict(s["json"])
        value = label_of(i, s)
        meta.pop("label", None)
        if value is not None:
            meta["label"] = value
        yield {**s, "json": meta}


def named(n, seed, prefix):
    """Trimodal synthetic samples whose label is a class name (the name of their synthetic class)."""
    return with_labels(
        synthetic_samples(n, seed=seed, prefix=prefix, image_size=32),
        lambda i, s: NAMES[s["json"]["label"]],
    )


def stream(shards, **overrides) -> StreamConfig:
    base = dict(shards=shards, batch_size=4, num_workers=0, image=ImageSpec(size=16), audio=None, train=False)
    return StreamConfig(**{**base, **overrides})


def tokenizer():
    return ClipTokenizer(context_length=16)


def run_config(train_shards, **data_fields):
    cfg = tiny()
    cfg.eval.batch_size = 8
    cfg.data.num_workers = 0
    cfg.data.train_shards = train_shards
    for name, value in data_fields.items():
        setattr(cfg.data, name, value)
    return cfg.validate()


def export_folder(folder: Path, cfg) -> str:
    """What `mmssl export` writes, for a randomly initialised model: `mmssl eval` reads it as a run."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(contiguous_copy(MultimodalModel(cfg.model).state_dict()), str(folder / "model.safetensors"))
    save_json(cfg, folder / "config.json")
    return str(folder)


# ------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"json": {"label": 3}}, 3),
        ({"json": {"label": "animals"}}, "animals"),
        ({"json": {"label": " 7 "}}, 7),  # a string holding an integer is a class id, as in a cls file
        ({"json": {"label": -1}}, None),
        ({"json": {"label": ""}}, None),
        ({"json": {"other": 1}}, None),
        ({"cls": b"4\n"}, 4),
        ({"cls": b" birds \n"}, "birds"),
    ],
)
def test_a_label_is_a_class_id_or_a_class_name(files, expected):
    raw = {"__key__": "k", "__url__": "s.tar", **{k: json.dumps(v).encode() if k == "json" else v
                                                 for k, v in files.items()}}  # fmt: skip
    assert read_label(raw, resolve_layout("mmssl")) == expected


def test_name_labels_in_img2dataset_json_train_every_sample_without_a_warning(tmp_path, caplog):
    def img2dataset_json(i, s):  # what img2dataset itself writes, plus a class name
        s["json"].update(
            original_width=64, original_height=48, exif="{}", sha256="ab" * 32, error_message=None
        )
        return ["animals", "plants"][i % 2]

    samples = list(with_labels(img2dataset_samples(12), img2dataset_json))
    for s in samples[::3]:
        del s["txt"]  # the caption is then the json's "caption"
    shards = write_shards(samples, tmp_path / "i2d", max_count=5)["pattern"]
    clap = write_shards(clap_samples(6), tmp_path / "clap", max_count=5)["pattern"]
    with caplog.at_level(logging.WARNING):
        train = build_loader(
            stream(shards, layout="img2dataset", train=True, shuffle_buffer=4), tokenizer=tokenizer()
        )
        batches = list(itertools.islice(train, 6))
        evaluated = list(build_loader(stream(shards, layout="img2dataset"), tokenizer=tokenizer()))
        clap_loader = build_loader(stream(clap, layout="clap", image=None), tokenizer=tokenizer())
        clap_batches = list(clap_loader)
    assert train.bad_data.counts == {} and all(b["__skipped__"] == {} for b in batches)
    assert all(b["present"]["text"].all() and b["present"]["image"].all() for b in batches + evaluated)
    assert all((b["label"] == -1).all() and set(b["label_name"]) <= {"animals", "plants"} for b in batches)
    names = {k: n for b in evaluated for k, n in zip(b["__key__"], b["label_name"], strict=True)}
    assert names == {s["__key__"]: s["json"]["label"] for s in samples}  # every sample, with its name
    assert sum(len(b["__key__"]) for b in clap_batches) == 6 and clap_loader.bad_data.counts == {}
    assert [r.getMessage() for r in caplog.records] == []


def test_bad_labels_are_counted_once_per_kind_and_the_samples_kept(tmp_path, caplog):
    values = [1.5, [1, 2], {"id": 1}, True, "cat", 3, None, 2.5]
    samples = list(with_labels(synthetic_samples(8, image_size=16), lambda i, s: values[i]))
    samples[6]["cls"] = b"\xff\xfe"  # not UTF-8
    samples[7]["json"] = b"{oops"  # does not parse: only the label is lost (the caption is in txt)
    shards = write_shards(samples, tmp_path, max_count=4)["pattern"]
    loader = build_loader(stream(shards, text=False), tokenizer=None)
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        batches = list(loader)
    got = {
        k: (int(y), n)
        for b in batches
        for k, y, n in zip(b["__key__"], b["label"], b["label_name"], strict=True)
    }
    assert len(got) == 8  # every sample kept
    assert got[samples[4]["__key__"]] == (-1, "cat") and got[samples[5]["__key__"]] == (3, "")
    assert {got[samples[i]["__key__"]] for i in (0, 1, 2, 3, 6, 7)} == {(-1, "")}
    assert loader.bad_data.counts == {"bad_label": 6}
    lines = [
        r.getMessage() for r in caplog.records
    ]  # a few lines per kind, then one saying the rest is counted
    assert all(line.startswith("kept sample") and "bad_label" in line for line in lines[:5])
    assert "float 1.5" in lines[0] and "list [1, 2]" in lines[1] and "dict" in lines[2] and "bool" in lines[3]
    assert lines[5:] == ["further bad_label samples are counted but not logged one by one"]
    assert loader.bad_data.format() == "bad data: 6 bad_label kept without their label"


def test_verify_reports_the_label_kinds_with_counts(tmp_path):
    values = [2, 5, "cat", "dog", "cat", None, [1]]
    shards = write_shards(with_labels(synthetic_samples(7), lambda i, s: values[i]), tmp_path)["pattern"]
    report = verify_shards(shards)
    assert report["labels"] == {"integer": 2, "name": 3, "absent": 1, "bad": 1}
    assert report["label_names"] == {"cat": 2, "dog": 1}
    assert [b["kind"] for b in report["bad_labels"]] == ["bad_label"] and report["good"] == 7
    text = format_verify_report(report)
    assert (
        "labels: integer 2, name 3 (2 classes: cat, dog), absent 1, bad 1; integers and names mixed" in text
    )
    assert verify_exit_code(report) == 0 and verify_exit_code(report, strict=True) == 1


# --------------------------------------------------------------------------- a stream that gives up


def test_a_stream_that_gives_up_names_the_commonest_kind_a_sample_and_a_likely_fix(
    tmp_path, monkeypatch, capsys
):
    shards = write_shards(img2dataset_samples(12), tmp_path, max_count=6)["pattern"]
    # read with the CLAP layout, image+text samples have none of the configured modalities
    cfg = stream(shards, layout="clap", train=True, num_workers=1, max_bad_in_a_row=8)
    with pytest.raises(BadDataError) as error:
        next(iter(build_loader(cfg, tokenizer=tokenizer(), check=False)))
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "8 bad samples in a row (8 no_modality), e.g. sample 'i2d"
    )
    assert f"of {tmp_path}/shard-00000" in message
    assert message.endswith("the shards hold jpg/json/txt: try data.layout=img2dataset or data.layout=mmssl")

    def train(cfg, resume=None):  # what the trainer meets: the loader raises in the training process
        next(iter(build_loader(cfg_of_run, tokenizer=tokenizer(), check=False)))

    cfg_of_run = cfg
    monkeypatch.setattr("mmssl.train.train", train)
    args = [f"data.train_shards={shards}", "data.layout=img2dataset", "train.eval_at_end=false"]
    assert main(["train", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"mmssl: error: {message}"]


# ----------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def named_splits(tmp_path_factory):
    """Trimodal train and test splits with class-name labels and no classes.json."""
    base = tmp_path_factory.mktemp("named")
    train = write_shards(named(16, 1, "tr"), base / "train", max_count=8)["pattern"]
    test = write_shards(named(12, 2, "te"), base / "test", max_count=6)["pattern"]
    return {
        "train": train,
        "test": test,
        "names": {s["__key__"]: s["json"]["label"] for s in named(12, 2, "te")},
    }


def test_zero_shot_on_name_labels_takes_the_sorted_names_as_its_classes(named_splits, tmp_path):
    cfg = run_config(named_splits["train"], eval_shards=named_splits["test"])
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model).eval()
    plan = EvalPlan(probe_shards=named_splits["train"])  # no --classes, no classes.json
    apply_overrides(cfg, ["eval.match=label"])
    results = run_eval(model, cfg, tmp_path, device=CPU, plan=plan, progress=False)

    classes = sorted(set(named_splits["names"].values()))
    assert results["zeroshot"]["classes"] == classes
    # the accuracy is scored against those ids: recompute it from the embeddings and the names
    test = embed_split(model, cfg, named_splits["test"], device=CPU, progress=False)
    assert test.label_names == [named_splits["names"][k] for k in test.keys]
    from mmssl.eval import zeroshot

    protos = zeroshot.Prompts(classes, zeroshot.DEFAULT_TEMPLATES).embed(
        model, data.tokenizer(cfg), device=CPU
    )
    truth = torch.tensor([classes.index(n) for n in test.label_names])
    for m in ("image", "audio"):
        top1 = float(((test.emb[m] @ protos.T).argmax(dim=1) == truth).float().mean())
        assert results["zeroshot"]["modalities"][m]["top1"] == pytest.approx(top1)
        assert results["zeroshot"]["modalities"][m]["samples"] == 12
    # retrieval's label rule compares the names; the probe's split maps onto the same ids
    assert results["rule"] == "label" and results["classes"] == len(classes)
    assert set(results["probe"]) == {"image", "text", "audio"}


def test_classes_json_by_the_shards_sets_the_order_and_must_list_every_name(named_splits, tmp_path):
    order = ["fox", *reversed(NAMES)]
    folder = tmp_path / "test"
    test = write_shards(named(12, 2, "te"), folder, max_count=6)["pattern"]
    (folder / "classes.json").write_text(json.dumps(order))
    cfg = run_config(named_splits["train"], eval_shards=test)
    model = MultimodalModel(cfg.model).eval()
    results = run_eval(model, cfg, tmp_path / "out", device=CPU, plan=EvalPlan(), progress=False)
    assert results["zeroshot"]["classes"] == order

    (folder / "classes.json").write_text(json.dumps(["fox", "owl"]))
    with pytest.raises(ValueError, match=r"sample 'te_\d+' of .*shard-00000\d.tar has the class name '\w+', which "
                       rf"{folder}/classes.json does not list"):  # fmt: skip
        run_eval(model, cfg, tmp_path / "out", device=CPU, plan=EvalPlan(), progress=False)


def split(labels_and_names, shard="s.tar"):
    n = len(labels_and_names)
    return Embeddings(
        emb={"image": torch.eye(n)},
        labels=torch.tensor([y for y, _ in labels_and_names]),
        keys=[f"k{i}" for i in range(n)],
        label_names=[name for _, name in labels_and_names],
        shards=[shard] * n,
    )


def test_name_labels_map_to_ids_in_one_place():
    test = split([(-1, "owl"), (-1, "ant"), (-1, ""), (-1, "owl")])
    probe = split([(-1, "eel"), (-1, "ant")])
    mapped, mapped_probe, classes = labels.resolve(test, None, source="", where="test", probe=probe)
    assert classes == ["ant", "owl"] and mapped.labels.tolist() == [1, 0, -1, 1]
    assert mapped_probe.labels.tolist() == [2, 0]  # a name only the probe split has comes after
    mapped, _, classes = labels.resolve(test, ["owl", "cat", "ant"], source="x", where="test")
    assert classes == ["owl", "cat", "ant"] and mapped.labels.tolist() == [0, 2, -1, 0]
    ints = split([(4, ""), (-1, "")])
    assert labels.resolve(ints, None, source="", where="test")[0].labels.tolist() == [4, -1]
    with pytest.raises(ValueError, match=r"hold different kinds of label: class names \(sample 'k0' of s.tar: "
                       r"'owl'\) and integers \(sample 'k0' of s.tar: 4\)"):  # fmt: skip
        labels.resolve(test, None, source="", where="test", probe=ints, probe_where="train")


def test_a_split_of_integer_and_name_labels_is_a_one_line_error_naming_one_of_each(
    named_splits, tmp_path, capsys
):
    samples = with_labels(synthetic_samples(8, image_size=32), lambda i, s: "owl" if i == 5 else i)
    mixed = write_shards(samples, tmp_path / "mixed", max_count=4)["pattern"]
    run = export_folder(tmp_path / "run", run_config(named_splits["train"]))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", run, "--data", mixed, "--no-probe", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmssl")]
    assert len(err) == 1  # (the rest of stderr is the progress bar, erased)
    assert (
        f"mixes integer labels (sample 'syn_000000' of {tmp_path}/mixed/shard-000000.tar: 0) and class names "
        f"(sample 'syn_000005' of {tmp_path}/mixed/shard-000001.tar: 'owl')" in err[0]
    )


# -------------------------------------------------------------------------------------- layouts


def test_eval_layout_follows_the_training_layout_unless_set():
    cfg = run_config("train/", layout="img2dataset", eval_shards="test/")
    assert data.stream_config(cfg, train=False).layout.name == "img2dataset"
    cfg.data.eval_layout = "clap"
    assert data.stream_config(cfg, train=False).layout.name == "clap"
    shared = [SourceConfig(shards="a/", layout="clap"), SourceConfig(shards="b/", layout="clap", weight=2)]
    cfg = run_config("", sources=tuple(shared), eval_shards="test/")
    assert cfg.data.eval_layout_name() == "clap"
    cfg.data.sources = (shared[0], SourceConfig(shards="b/", layout="img2dataset"))
    with pytest.raises(ValueError, match=r"^data.eval_layout: the training sources have layouts \['clap', "
                       r"'img2dataset'\].* set data.eval_layout"):  # fmt: skip
        data.check_shards(cfg)  # a mistake in the config: found before any shard is looked at
    cfg.data.eval_layout = "mmssl"
    assert cfg.validate().data.eval_layout_name() == "mmssl"


def test_mmssl_eval_reads_the_data_with_the_runs_layout_unless_overridden(tmp_path, capsys):
    samples = list(img2dataset_samples(10, image_size=32))
    for s in samples[::2]:
        del s["txt"]  # only img2dataset's json:caption gives these a caption
    i2d = write_shards(samples, tmp_path / "i2d", max_count=5)["pattern"]
    run = export_folder(tmp_path / "run", run_config(i2d, layout="img2dataset"))
    out = tmp_path / "out"
    assert main(["eval", run, "--data", i2d, "--no-probe", "--out", str(out)]) == 0
    assert "(layout img2dataset, 1 rank(s))" in capsys.readouterr().out
    results = json.loads((out / "eval.json").read_text())
    assert results["samples"] == 10 and results["pairs"]["image->text"]["queries"] == 10

    with pytest.raises(SystemExit) as exit_info:
        main(["eval", run, "--data", i2d, "--no-probe", "--out", str(out), "data.eval_layout=clap"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "--data (layout clap)" in err[0]


def test_mmssl_embed_writes_class_ids_of_name_labels_and_the_names(named_splits, tmp_path):
    from mmssl.embed import embed_shards

    cfg = run_config(named_splits["train"])
    model = MultimodalModel(cfg.model).eval()
    manifest = embed_shards(model, cfg, named_splits["test"], tmp_path, device=CPU, source="random")
    classes = manifest["classes"]
    assert classes == sorted(set(named_splits["names"].values()))
    keys = (tmp_path / "image_keys.txt").read_text().split()
    ids = np.load(tmp_path / "image_labels.npy").tolist()
    assert [classes[i] for i in ids] == [named_splits["names"][k] for k in keys]
