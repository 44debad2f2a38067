"""Bring-your-own towers (mmssl/encoders/timm_tower.py, hf_text.py): timm image and spectrogram ViTs and a
local Hugging Face text encoder, each tiny and random, built here (nothing is downloaded). Visible-token
selection sees only the kept patches, padding never changes a text embedding, MLM trains the model's
own head, FLOPs match torch's counter, setting mistakes are one line, and one 2-rank ZeRO-3 run with
both kinds exports a model that embeds as the trained one does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmssl import cli, data
from mmssl.config import apply_overrides
from mmssl.encoders import build_encoder, check_towers
from mmssl.flops import train_flops_per_sample
from mmssl.optional import MissingExtra, require
from mmssl.presets import get_preset
from mmssl.task import Task

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "sample",
    "a",
    "tone",
    "of",
    "class",
    ":",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "the",
    "dog",
]


def write_bert(path: Path, *, masked_lm: bool = True, tie: bool = True) -> Path:
    """A tiny random BERT (or, without ``masked_lm``, a GPT-2: no masked-LM model in transformers) with a
    word-level BERT tokenizer, saved as a local model directory; ``tie``: its masked-LM head's output
    weight is the word embedding."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    if masked_lm:
        config = transformers.BertConfig(
            vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, tie_word_embeddings=tie,
        )  # fmt: skip
        transformers.BertForMaskedLM(config).save_pretrained(path)
    else:
        config = transformers.GPT2Config(
            vocab_size=len(WORDS) + 5, n_embd=32, n_layer=1, n_head=2, n_positions=32
        )
        transformers.GPT2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return write_bert(tmp_path_factory.mktemp("hf") / "bert")


def towers_cfg(bert: Path, *extra: str):
    """tiny_timm (timm image and audio ViTs, 2 blocks of width 64) with the tiny BERT as text tower."""
    return apply_overrides(
        get_preset("tiny_timm"), ["model.text.kind=hf", f"model.text.hf_path={bert}", *extra]
    ).validate()


def test_timm_vit_sees_only_the_kept_patches():
    torch.manual_seed(0)
    cfg = get_preset("tiny_timm").model
    tower = build_encoder(cfg.image, cfg.embed_dim).eval()
    assert tower.token_based and tower.grid == (4, 4) and tower.width == 64 and tower.num_prefix_tokens == 1
    x = torch.randn(3, 3, 32, 32)
    whole = tower(x)
    assert whole.shape == (3, cfg.embed_dim)
    every = torch.arange(16).expand(3, 16)
    assert torch.allclose(tower(x, every), whole, atol=1e-5)  # keeping all = the unmasked pass
    keep = torch.tensor([[0, 5, 10, 15]] * 3)
    features = tower.forward_features(x, keep)
    assert features.shape == (3, 1 + 4, 64)
    hidden = x.clone()
    hidden[:, :, :8, 8:16] += 5.0  # patch 1 of the 4 x 4 grid: masked
    assert torch.allclose(tower(hidden, keep), tower(x, keep), atol=1e-5)
    seen = x.clone()
    seen[:, :, 8:16, 8:16] += 5.0  # patch 5: kept
    assert not torch.allclose(tower(seen, keep), tower(x, keep), atol=1e-3)
    assert tower.patchify(x).shape == (3, 16, 3 * 8 * 8)


def test_timm_audio_tower_is_a_one_channel_spectrogram_vit():
    cfg = get_preset("tiny_timm").model.audio
    tower = build_encoder(cfg, 64)
    assert tower.trunk.patch_embed.proj.weight.shape[1:] == (1, cfg.patch_freq, cfg.patch_time)
    assert tower.grid == cfg.grid  # the native audio tower's patch grid: trailing frames dropped
    x = torch.randn(2, cfg.n_mels, cfg.n_frames)
    assert tower(x).shape == (2, 64)
    assert tower.patchify(x).shape == (2, cfg.grid[0] * cfg.grid[1], cfg.patch_freq * cfg.patch_time)


def test_hf_text_tower_pools_without_padding_and_tokenizes_like_the_loader(bert):
    cfg = towers_cfg(bert)
    tok = data.tokenizer(cfg)
    ids = tok(["a tone of class 7", "sample 3 : the dog"])  # [2, 16]
    assert ids.shape == (2, cfg.model.text.context_length) and ids[0, 0] == 2 and (ids[0, 7:] == 0).all()
    assert data.trims_text(cfg)  # BERT pads with 0: batches may be cut after their longest caption
    for pooler in ("cls", "mean"):
        cfg.model.text.pooler = pooler
        tower = build_encoder(cfg.model.text, cfg.model.embed_dim).eval()
        full = tower(ids)
        assert full.shape == (2, cfg.model.embed_dim) and torch.isfinite(full).all()
        assert torch.allclose(tower(ids[:, :8]), full, atol=1e-5)  # padding changes nothing
        assert torch.isfinite(tower(torch.zeros(1, 16, dtype=torch.long))).all()  # an absent caption


def test_mlm_trains_the_models_own_head_and_masked_towers_get_gradients(bert):
    cfg = towers_cfg(bert, *(f"objectives.masked_{m}.enabled=true" for m in ("image", "text", "audio")))
    torch.manual_seed(0)
    task = Task(cfg)
    saved = transformers.AutoModelForMaskedLM.from_pretrained(bert, local_files_only=True)
    assert torch.equal(
        task.masked_text.head.predictions.transform.dense.weight, saved.cls.predictions.transform.dense.weight
    )
    assert task.masked_text.vocab.mask == 4 and task.masked_text.vocab.pad == 0
    b = 4
    text = data.tokenizer(cfg)(["a tone of class 1 2 3 4 5 6", "sample 9 : a tone of class 9"] * 2)
    a = cfg.model.audio
    batch = {"image": torch.randn(b, 3, 32, 32), "text": text, "audio": torch.randn(b, a.n_mels, a.n_frames)}
    batch["present"] = {m: torch.ones(b, dtype=torch.bool) for m in ("image", "text", "audio")}
    out = task(batch)
    assert {"masked_image_loss", "masked_text_loss", "masked_audio_loss"} <= out.keys()
    assert out["masked_image_ratio"] == 0.75
    out["loss"].backward()
    for name in ("model.image.trunk.blocks.0.attn.qkv.weight", "model.audio.trunk.patch_embed.proj.weight",
                 "model.text.encoder.encoder.layer.0.attention.self.query.weight",
                 "masked_text.head.predictions.transform.dense.weight"):  # fmt: skip
        assert task.get_parameter(name).grad.abs().sum() > 0, name


def test_flop_count_matches_torch_counter_with_masks_and_views(bert):
    cfg = towers_cfg(
        bert, "objectives.masked_image.enabled=true", "objectives.masked_text.enabled=true",
        "objectives.views.image.enabled=true",
    )  # fmt: skip
    torch.manual_seed(0)
    task = Task(cfg)
    b = 4
    text = data.tokenizer(cfg)(["a tone of class 1 2 3 4 5 6 7 8 9 0 1 2 3"] * b)  # every position a token
    a = cfg.model.audio
    batch = {"image": torch.randn(b, 3, 32, 32), "text": text, "audio": torch.randn(b, a.n_mels, a.n_frames)}
    batch["present"] = {m: torch.ones(b, dtype=torch.bool) for m in ("image", "text", "audio")}
    batch["image_view"] = torch.randn(b, 3, 32, 32)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        task(batch)["loss"].backward()

    assert train_flops_per_sample(cfg, b) == pytest.approx(counter.get_total_flops() / b, rel=2e-3)


def test_grad_checkpointing_keeps_gradients(bert):
    grads = []
    for on in ("false", "true"):
        cfg = towers_cfg(bert, f"model.image.grad_checkpointing={on}", f"model.text.grad_checkpointing={on}")
        torch.manual_seed(0)
        model = Task(cfg).model.train()
        image, text = torch.randn(2, 3, 32, 32), data.tokenizer(cfg)(["a tone", "of class 3"])
        (model.embed("image", image).sum() + model.embed("text", text).sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) and all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True)
    )


def test_lock_and_timm_weights_from_init_from(bert, tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                               embed_dim=64, depth=2, num_heads=2, patch_size=8)  # fmt: skip
    torch.save(source.state_dict(), tmp_path / "vit.pt")  # timm's own keys, with its classifier
    cfg = towers_cfg(bert, f"model.image.init_from={tmp_path / 'vit.pt'}", "model.image.lock=true",
                     "model.image.unlocked_groups=1", "model.text.lock=true")  # fmt: skip
    from mmssl.pretrained import initialize

    task = Task(cfg)
    (match,) = initialize(task, cfg, show=False)
    assert match.clean and len(match.load) == len(source.state_dict()) - 2  # all but head.weight/bias
    assert torch.equal(task.model.image.trunk.pos_embed, source.pos_embed)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert "image.proj" in trainable and not any(n.startswith(("image.trunk.", "text.")) for n in trainable)
    with pytest.raises(
        ValueError, match="unlocked_groups=2: a model.image.kind=timm tower locks as two groups"
    ):
        towers_cfg(bert, "model.image.lock=true", "model.image.unlocked_groups=2")


def test_setting_mistakes_are_one_line_before_any_rank(bert, tmp_path, capsys):
    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["train", "--run-dir", str(tmp_path / "r"), *args])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "model.text.hf_path must name a local Hugging Face model directory" in error("--preset", "tiny_hf")
    assert "not a Hugging Face model directory" in error(
        "--preset", "tiny_hf", f"model.text.hf_path={tmp_path}"
    )
    assert "model.image.timm_name='vit_nope' is not a timm model" in error(
        "--preset", "tiny_timm", "model.image.timm_name=vit_nope"
    )
    assert "MAE needs a token-based tower" in error(
        "--preset",
        "tiny_timm",
        "model.image.timm_name=resnet18",
        "model.image.timm_kwargs={}",
        "objectives.masked_image.enabled=true",
    )
    gpt2 = write_bert(tmp_path / "gpt2", masked_lm=False)
    capsys.readouterr()  # its saving's progress bar
    assert "has no masked-LM head" in error(
        "--preset", "tiny_hf", f"model.text.hf_path={gpt2}", "objectives.masked_text.enabled=true"
    )
    masked = ("--preset", "tiny_hf", "objectives.masked_text.enabled=true")
    assert (
        "is tied to its word embeddings (tie_word_embeddings in its config.json): set tie_head=true"
        in error(*masked, f"model.text.hf_path={bert}", "objectives.masked_text.tie_head=false")
    )
    untied = write_bert(tmp_path / "untied", tie=False)
    capsys.readouterr()
    assert "is not tied to its word embeddings" in error(*masked, f"model.text.hf_path={untied}")
    assert "engine.compile compiles mmssl's native towers only" in error(
        "--preset", "tiny_timm", "engine.compile=true"
    )


def test_a_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"model.image.kind=timm needs the timm package.*mmssl\[towers\]"):
        require("timm", "model.image.kind=timm")
    with pytest.raises(ValueError, match="pip install 'mmssl\\[towers\\]'"):  # the CLI's one line
        check_towers(get_preset("tiny_timm"))


@pytest.mark.distributed
def test_two_ranks_zero3_with_timm_and_hf_then_export_embeds_the_same(bert, tmp_path):
    from data_pipelines import synthetic_samples, write_shards

    train = write_shards(synthetic_samples(32, seed=1, image_size=32), tmp_path / "train", max_count=16)
    test = write_shards(
        synthetic_samples(16, seed=2, prefix="te", image_size=32), tmp_path / "test", max_count=8
    )
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "mmssl.cli", "train", "--preset", "tiny_timm", "--nproc", "2",
        "--run-dir", str(run_dir), f"data.train_shards={train['pattern']}", "data.num_workers=0",
        f"data.eval_shards={test['pattern']}",
        "model.text.kind=hf", f"model.text.hf_path={bert}", "objectives.masked_image.enabled=true",
        "objectives.masked_text.enabled=true", "engine.zero_stage=3", "train.steps=2", "train.log_every=1",
        "optim.micro_batch_size=4", "optim.warmup_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MFLOP/sample" in proc.stdout and "ZeRO-3" in proc.stdout
    assert (
        run_dir / "eval.json"
    ).is_file()  # evaluated at the end: retrieval, zero-shot with BERT's tokenizer

    from mmssl import api
    from mmssl.export import export

    summary = export(run_dir, tmp_path / "export")
    assert "timm model" in summary["open_clip"]["skipped"]
    trained, exported = api.load(run_dir), api.load(tmp_path / "export")
    assert Path(exported.cfg.model.text.hf_path) == tmp_path / "export" / "hf_text"  # its own copy
    captions = ["a tone of class 3", "sample 1 : the dog"]
    images = torch.rand(2, 3, 32, 32)
    audio = torch.randn(2, 32, exported.cfg.model.audio.n_frames)
    for modality, x in (("text", captions), ("image", images), ("audio", audio)):
        embed = {"text": "embed_texts", "image": "embed_images", "audio": "embed_audio"}[modality]
        a, b = getattr(trained, embed)(x), getattr(exported, embed)(x)
        assert a.shape == (2, 64) and torch.allclose(a, b, atol=1e-6), modality
    saved = transformers.AutoModel.from_pretrained(bert, local_files_only=True)  # where training started
    trained_words = exported.model.text.encoder.embeddings.word_embeddings.weight
    assert not torch.allclose(trained_words, saved.embeddings.word_embeddings.weight)  # the run's weights
