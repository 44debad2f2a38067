"""`mmssl export`: consolidated fp32 safetensors from a ZeRO-3 checkpoint (bit-exact, loads back to
the same embeddings) and an open_clip checkpoint that open_clip builds offline and that embeds
images and texts as our towers do."""

import json

import open_clip
import pytest
import torch
from run_fixture import tiny_run
from safetensors.torch import load_file

from mmssl import api, checkpoint, data, engine
from mmssl.cli import main
from mmssl.config import save_json
from mmssl.export import export, open_clip_incompatibility
from mmssl.model import MultimodalModel
from mmssl.presets import tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert main(["export", str(trained["run_dir"]), "--out", str(out)]) == 0
    return out


def test_safetensors_hold_the_consolidated_weights(trained, exported, capsys):
    state = engine.consolidated_state_dict(trained["run_dir"] / "checkpoints")  # ZeRO-3 partitions
    saved = load_file(str(exported / "model.safetensors"))
    model_keys = {k.removeprefix("model.") for k in state if k.startswith("model.")}
    assert model_keys == {k for k in saved if not k.startswith("logit_scale.")}
    for key in model_keys:
        assert torch.equal(saved[key], state[f"model.{key}"]), key
    for pair in ("image_text", "image_audio", "text_audio"):
        assert float(saved[f"logit_scale.{pair}"]) == float(state[f"contrastive.logit_scale.{pair}"].detach())
    summary = json.loads((exported / "export.json").read_text())
    assert summary["towers"] == ["image", "text", "audio"] and "dir" in summary["open_clip"]

    # the export folder loads back (API, eval, embed all accept it) to the same model
    a, b = api.load(trained["run_dir"]), api.load(exported)
    tokens = a.tokenize(["a tone of class 3", "sample 7"])
    audio = torch.randn(2, *a.preprocess_audio([torch.zeros(100)], sample_rate=8000).shape[1:])
    assert torch.equal(a.embed("text", tokens), b.embed("text", tokens))
    assert torch.equal(a.embed("audio", audio), b.embed("audio", audio))


def test_open_clip_builds_it_offline_and_embeds_the_same(exported):
    ours = checkpoint.load(exported)
    oc = open_clip.create_model(f"local-dir:{exported / 'open_clip'}", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{exported / 'open_clip'}")
    captions = ["a tone of class 3", "sample 12: a tone of class 7", ""]
    tokens = data.tokenizer(ours.cfg)(captions)
    assert torch.equal(tokenizer(captions), tokens)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(images), ours.model.image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(oc.encode_text(tokens), ours.model.text(tokens), rtol=0, atol=1e-5)
        assert float(oc.logit_scale) == pytest.approx(ours.log_logit_scales["image_text"])
        # and the towers are not trivially equal (a zero tower would pass the checks above)
        assert ours.model.embed("image", images).std(dim=0).mean() > 1e-3


def test_no_open_clip_checkpoint_for_a_bidirectional_text_tower(tmp_path, capsys):
    cfg = tiny()
    cfg.model.text.causal = False
    assert "bidirectional" in open_clip_incompatibility(cfg)
    cfg.model.image = None
    assert "image and a text tower" in open_clip_incompatibility(cfg)
    cfg.model.image = tiny().model.image
    # an export folder made by hand (no DeepSpeed needed) exports again, without open_clip
    src = tmp_path / "src"
    src.mkdir()
    from safetensors.torch import save_file

    save_file(MultimodalModel(cfg.model).state_dict(), str(src / "model.safetensors"))
    save_json(cfg, src / "config.json")
    summary = export(src, tmp_path / "out")
    assert "bidirectional" in summary["open_clip"]["skipped"]
    assert not (tmp_path / "out" / "open_clip").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()
