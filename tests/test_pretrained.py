"""Starting from existing weights (mmssl/pretrained.py): open_clip checkpoints saved as open_clip_train
and as safetensors embed as open_clip embeds; an mmssl export round-trips; position embeddings resize
as open_clip's ``resize_pos_embed`` / ``resize_text_pos_embed``; a mismatch is refused in one line."""

import copy
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from safetensors.torch import save_file

from mmssl import checkpoint, pretrained
from mmssl.cli import main
from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID, RunConfig, save_json
from mmssl.export import export, open_clip_config, open_clip_key
from mmssl.lock import describe
from mmssl.model import MultimodalModel
from mmssl.presets import tiny
from mmssl.task import Task

REPO = Path(__file__).resolve().parents[1]


def config(**image_text) -> RunConfig:
    cfg = tiny()
    cfg.model.text.vocab_size = 49408  # open_clip's vocabulary (no [MASK] id: no masked text here)
    for key, value in image_text.items():
        tower, field = key.split("__")
        setattr(getattr(cfg.model, tower), field, value)
    return cfg.validate()


def open_clip_model(cfg: RunConfig) -> open_clip.CLIP:
    """open_clip's CLIP from the config export writes for these towers (random weights, nothing read)."""
    torch.manual_seed(3)
    return open_clip.CLIP(**open_clip_config(cfg)["model_cfg"]).eval()


def inputs(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = cfg.model.image.image_size
    images = torch.randn(3, 3, size, size, generator=g)
    text = torch.randint(1, 4000, (3, cfg.model.text.context_length), generator=g)
    text[:, 0], text[:, 6], text[:, 7:] = SOT_TOKEN_ID, EOT_TOKEN_ID, 0
    return images, text


def started(cfg: RunConfig, path, **model_fields) -> Task:
    cfg = copy.deepcopy(cfg)
    cfg.model.init_from = str(path)
    for name, value in model_fields.items():
        setattr(cfg.model, name, value)
    torch.manual_seed(0)
    task = Task(cfg)
    pretrained.initialize(task, cfg)
    return task.eval()


@pytest.mark.parametrize("fmt", ["open_clip_train", "safetensors"])
def test_open_clip_checkpoint_embeds_as_open_clip(tmp_path, fmt, capsys):
    cfg = config()
    oc = open_clip_model(cfg)
    with torch.no_grad():
        oc.logit_scale.fill_(2.5)
    if fmt == "safetensors":
        path = tmp_path / "oc.safetensors"
        save_file(oc.state_dict(), str(path))
    else:  # open_clip_train's checkpoint: a DDP-wrapped model's state dict inside {"state_dict": ...}
        path = tmp_path / "epoch_1.pt"
        state = {f"module.{k}": v for k, v in oc.state_dict().items()}
        torch.save({"epoch": 1, "name": "x", "state_dict": state, "optimizer": {}}, path)
    task = started(cfg, path)
    images, text = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(task.model.image(images), oc.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(task.model.text(text), oc.encode_text(text), rtol=0, atol=1e-5)
    assert float(task.contrastive.logit_scale["image_text"].detach()) == 2.5
    table = capsys.readouterr().out
    assert "image" in table and "text" in table and "(holds no audio tower: stays as initialised)" in table


def test_mmssl_export_round_trips_and_its_open_clip_file_loads_back(tmp_path):
    cfg = config()
    torch.manual_seed(7)
    source = MultimodalModel(cfg.model)
    folder = tmp_path / "src"
    folder.mkdir()
    save_file(source.state_dict(), str(folder / "model.safetensors"))
    save_json(cfg, folder / "config.json")
    export(folder, tmp_path / "out")
    want = source.state_dict()
    for path in (tmp_path / "out", tmp_path / "out" / "model.safetensors"):
        got = started(cfg, path).model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), path
    # export's open_clip checkpoint, read back through the inverse renaming: image and text towers
    got = started(cfg, tmp_path / "out" / "open_clip" / "open_clip_model.safetensors").model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("audio."))
    assert not torch.equal(got["audio.proj"], want["audio.proj"])  # open_clip has no audio tower


def test_position_embeddings_resize_as_open_clip(tmp_path):
    small = config()
    oc = open_clip_model(small)
    path = tmp_path / "oc.safetensors"
    save_file(oc.state_dict(), str(path))
    big = config(image__image_size=48, text__context_length=24)
    task = started(big, path)
    expected = {k: v.clone() for k, v in oc.state_dict().items()}
    target = open_clip_model(big)
    resize_pos_embed(expected, target)
    resize_text_pos_embed(expected, target)
    ours = task.model.state_dict()
    assert ours["image.positional_embedding"].shape == (1 + 6 * 6, 64)
    torch.testing.assert_close(ours["image.positional_embedding"], expected["visual.positional_embedding"])
    assert ours["text.positional_embedding"].shape == (24, 64)
    torch.testing.assert_close(ours["text.positional_embedding"], expected["positional_embedding"])
    # and the resized model embeds as open_clip does with the resized state dict
    target.load_state_dict(expected)
    images, text = inputs(big)
    with torch.no_grad():
        torch.testing.assert_close(task.model.image(images), target.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(task.model.text(text), target.encode_text(text), rtol=0, atol=1e-5)


def test_a_mismatch_is_refused_in_one_line_unless_not_strict(tmp_path, capsys):
    path = tmp_path / "oc.safetensors"
    save_file(open_clip_model(config()).state_dict(), str(path))
    narrow = config(image__width=32)
    with pytest.raises(ValueError) as e:
        started(narrow, path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"model.init_from={path}: the image tower")
    assert "of another shape" in message and "model.init_strict=false" in message
    # a tower's own source holding nothing for it is refused too
    cfg = config()
    cfg.model.audio.init_from = str(path)
    with pytest.raises(ValueError, match=r"model.audio.init_from=.*holds no weights for it"):
        started(cfg, path)

    capsys.readouterr()
    task = started(narrow, path, init_strict=False)
    table = capsys.readouterr().out
    ours = task.model.state_dict()
    reference = open_clip_model(config()).state_dict()
    assert torch.equal(ours["text.token_embedding.weight"], reference["token_embedding.weight"])
    assert "image other shape: image.class_embedding (64,) -> (32,)" in table


def test_a_missing_path_is_one_line_before_any_rank_starts(demo_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
        ["train", "--preset", "tiny", "--run-dir", str(tmp_path / "run"),
         f"data.train_shards={demo_shards}/train", "data.eval_shards=", "model.image.init_from=/nowhere/ViT.pt"]
    )  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "mmssl: error: model.image.init_from: /nowhere/ViT.pt does not exist"
    assert not (tmp_path / "run").exists()


def test_a_run_starts_from_open_clip_with_a_locked_image_tower(demo_shards, tmp_path):
    """Launched (1 rank, ZeRO-3, 1 step): the table and the trainable count are printed, and the saved
    checkpoint's locked image tower is open_clip's, bit for bit (loaded before the engine, never stepped)."""
    oc = open_clip_model(config())  # open_clip's 49408 ids; the run's vocabulary has a [MASK] id more
    path = tmp_path / "oc.safetensors"
    save_file(oc.state_dict(), str(path))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny", "--run-dir", str(run_dir),
         f"data.train_shards={demo_shards}/train", "data.eval_shards=", "data.num_workers=0",
         "optim.micro_batch_size=8", "train.steps=1", "engine.zero_stage=3",
         f"model.init_from={path}", "model.image.lock=true"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "text.token_embedding.weight (49408, 64) -> (49409, 64) (our extra ids kept)" in proc.stdout
    locked = tiny()
    locked.model.image.lock = True
    counts = describe(Task(locked))  # sizes read before the engine (ZeRO-3 empties the parameters)
    assert "M train)" in counts and f"training tiny: {counts}," in proc.stdout
    saved = checkpoint.load(run_dir).model.state_dict()
    reference = oc.state_dict()
    for key, value in saved.items():
        if key.startswith("image."):
            assert torch.equal(value, reference[open_clip_key(key)]), key
    assert not torch.equal(saved["text.text_projection"], reference["text_projection"])  # it trained


def test_the_check_before_ranks_start_reads_headers_not_weights(tmp_path, monkeypatch):
    """pretrained.check matches shapes from a safetensors header, a memory-mapped torch file and an
    export's config; every rank reads the weights later, so reading them here too would double start-up
    I/O. Fails if the check loads tensors' bytes."""
    import safetensors.torch

    cfg = config()
    oc = open_clip_model(cfg).state_dict()
    save_file(oc, str(tmp_path / "oc.safetensors"))
    torch.save({"state_dict": oc}, tmp_path / "oc.pt")
    folder = tmp_path / "src"
    folder.mkdir()
    save_file(MultimodalModel(cfg.model).state_dict(), str(folder / "model.safetensors"))
    save_json(cfg, folder / "config.json")
    export(folder, tmp_path / "out")

    def refuse(*args, **kwargs):
        raise AssertionError("the check read whole weights")

    real_load = torch.load

    def mapped_only(*args, **kwargs):
        assert kwargs.get("mmap"), "the check read a torch file instead of mapping it"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(checkpoint, "load", refuse)
    monkeypatch.setattr(torch, "load", mapped_only)
    for path in ("oc.safetensors", "oc.pt", "out"):
        big = config(image__image_size=48)  # a resized position embedding, matched on shapes alone
        big.model.init_from = str(tmp_path / path)
        pretrained.check(big)
        narrow = config(image__width=32)
        narrow.model.init_from = str(tmp_path / path)
        with pytest.raises(ValueError, match="of another shape"):
            pretrained.check(narrow)
