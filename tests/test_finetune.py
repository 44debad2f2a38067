"""Fine-tuning for classification (mmssl/finetune.py, mmssl/finetune_run.py, mmssl/eval/classify.py):
the scores against scikit-learn, the loss with label smoothing, the task's labels and frozen parts,
layer-wise learning-rate decay, the classes found in the data, a linear fine-tune that leaves the tower
bit-identical, and a 2-rank fine-tune killed and resumed exactly (sharing the tiny pretrained run of
tests/run_fixture.py)."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from batches import padded_batch
from gloo_pool import spawned
from run_fixture import REPO, tiny_run
from sklearn import metrics as skm
from test_resume import consumed, losses, rank_pid

from data_pipelines import write_shards
from mmssl import cli
from mmssl.config import apply_overrides
from mmssl.eval.classify import score_classification
from mmssl.finetune import FinetuneTask
from mmssl.finetune_config import FinetuneConfig
from mmssl.lock import layer_groups
from mmssl.objectives.classify import IGNORE, ClassificationLoss
from mmssl.presets import tiny


def finetune_cfg(*overrides: str, tower: str = "audio", classes=("a", "b", "c")):
    cfg = tiny()
    cfg.finetune = FinetuneConfig(tower=tower, num_classes=len(classes), classes=tuple(classes))
    return apply_overrides(cfg, list(overrides)).validate()


def test_finetune_config_round_trips_and_names_bad_fields(tmp_path):
    from mmssl.config import load_json, save_json

    cfg = finetune_cfg("finetune.layer_decay=0.65", "finetune.linear=true")
    save_json(cfg, tmp_path / "config.json")
    assert load_json(tmp_path / "config.json") == cfg
    for override, message in [
        ("finetune.label_smoothing=1.0", "finetune.label_smoothing must be in [0, 1)"),
        ('finetune.classes=["a","b"]', "finetune.classes names 2 classes but finetune.num_classes=3"),
        ("finetune.num_classes=1", "finetune.num_classes must be at least 2"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            finetune_cfg(override)
    with pytest.raises(ValueError, match="finetune.tower=text but model.text is off"):
        finetune_cfg("model.text=null", tower="text")


def test_finetune_with_eval_data_evaluates_though_its_pretrained_run_did_not(tmp_path):
    from mmssl.config import save_json
    from mmssl.finetune_run import finetune_config

    pretrained = tiny()
    pretrained.train.eval_at_end = False  # as fsdd_benchmark.py's runs
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    save_json(pretrained, tmp_path / "config.json")

    def made(*overrides, eval_shards="held/out-{0..1}.tar"):
        kw = dict(shards="train-{0..1}.tar", tower="audio", eval_shards=eval_shards)
        return finetune_config(tmp_path, **kw, overrides=["finetune.num_classes=3", *overrides]).train

    assert made().eval_at_end
    assert not made(eval_shards="").eval_at_end and not made("train.eval_at_end=false").eval_at_end


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_scores_match_scikit_learn():
    gen = torch.Generator().manual_seed(0)
    n, c = 200, 8
    labels = torch.randint(0, c - 2, (n,), generator=gen)  # classes 6 and 7 are never true
    logits = torch.randn(n, c, generator=gen)
    logits[:, [5, 7]] -= 100  # 5 and 7 are never predicted: 7 has no F1 at all
    logits[labels == 2, 2] += 3  # a good class and some bad ones
    got = score_classification(logits, labels, [f"c{i}" for i in range(c)])
    y, p = labels.numpy(), logits.argmax(1).numpy()
    assert got["top1"] == pytest.approx(skm.accuracy_score(y, p))
    assert got["top5"] == pytest.approx(skm.top_k_accuracy_score(y, logits.numpy(), k=5, labels=range(c)))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    present = sorted(set(y.tolist()))
    recall = skm.recall_score(y, p, labels=present, average=None)
    assert got["per_class_recall"] == pytest.approx(
        {f"c{k}": r for k, r in zip(present, recall, strict=True)}
    )
    assert got["mean_per_class_recall"] == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert got["confusion"] == skm.confusion_matrix(y, p, labels=range(c)).tolist()
    assert got["samples"] == n and got["top_k"] == 5
    # unlabelled rows (-1) are left out, not counted as errors
    with_unlabelled = score_classification(
        torch.cat([logits, logits[:5]]), torch.cat([labels, -torch.ones(5).long()])
    )
    assert with_unlabelled["top1"] == got["top1"] and with_unlabelled["samples"] == n


def test_loss_smooths_labels_and_leaves_out_unlabelled_rows():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, 3, IGNORE, 1, IGNORE, 2])
    s = 0.2
    out = ClassificationLoss(s)(logits, labels)
    known = labels >= 0
    logp = logits[known].log_softmax(-1)
    target = torch.full_like(logp, s / 4).scatter_(1, labels[known][:, None], 1 - s + s / 4)
    assert out["classify_loss"] == pytest.approx(float(-(target * logp).sum(1).mean()), rel=1e-6)
    assert out["labelled"] == 4
    assert out["accuracy"] == pytest.approx(float((logits[known].argmax(1) == labels[known]).float().mean()))
    plain = ClassificationLoss(0.0)(logits, labels)["classify_loss"]
    assert plain == pytest.approx(float(F.cross_entropy(logits[known], labels[known])), rel=1e-6)
    none = ClassificationLoss(s)(logits, torch.full((6,), IGNORE))["classify_loss"]
    assert none == 0 and torch.isfinite(none)  # a batch without labels: no NaN, no gradient


def test_task_maps_names_ignores_absent_rows_and_freezes_what_it_does_not_train():
    task = FinetuneTask(finetune_cfg())
    batch = padded_batch(task.cfg, 4, eot=5, vocab=4000)
    batch["__key__"] = ["k0", "k1", "k2", "k3"]
    batch["label"] = torch.tensor([-1, -1, 2, -1])
    batch["label_name"] = ["c", "a", "", ""]
    batch["present"]["audio"][1] = False
    assert task.labels(batch).tolist() == [2, IGNORE, 2, IGNORE]
    out = task(batch)
    assert out["labelled"] == 2 and set(out) == {"loss", "classify_loss", "accuracy", "labelled"}
    out["loss"].backward()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert "model.audio.proj" not in trainable  # the head reads pooled features, not the projection
    assert {n for n, p in task.named_parameters() if p.grad is not None} == trainable
    batch["label_name"][3] = "zebra"
    with pytest.raises(ValueError, match="'k3' has the class name 'zebra'"):
        task.labels(batch)
    linear = FinetuneTask(finetune_cfg("finetune.linear=true"))
    assert {n for n, p in linear.named_parameters() if p.requires_grad} == {
        "head.linear.weight",
        "head.linear.bias",
    }
    linear.train()
    assert linear.head.training and not linear.tower.training


@pytest.mark.parametrize("tower", ["image", "text"])
def test_every_tower_takes_a_head(tower):
    task = FinetuneTask(finetune_cfg(tower=tower))
    batch = padded_batch(task.cfg, 3, eot=5, vocab=4000)
    batch.update(__key__=["a", "b", "c"], label=torch.tensor([0, 2, 1]), label_name=[""] * 3)
    assert task.logits(batch).shape == (3, 3)
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and task.head.linear.weight.grad.abs().sum() > 0
    assert task.tower.transformer.resblocks[0].attn.in_proj_weight.grad is not None


def test_layer_decay_scales_each_group_from_the_head_down():
    from mmssl.engine import param_groups

    cfg = finetune_cfg("finetune.layer_decay=0.5", "optim.lr=1.0", tower="image")
    task = FinetuneTask(cfg)
    scales = task.lr_scales()
    groups = layer_groups(task.tower)  # embeddings, block 0, block 1 + final norm, projection
    depth = cfg.model.image.depth
    assert [scales[id(g[0])] for g in groups[:-1]] == [0.5 ** (depth + 1 - k) for k in range(depth + 1)]
    assert not any(id(p) in scales for p in task.head.parameters())  # the head: optim.lr
    made = param_groups(task, cfg)
    seen = [id(p) for g in made for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in task.parameters() if p.requires_grad)  # each once
    for g in made:
        assert all(g["lr"] == scales.get(id(p), 1.0) for p in g["params"])
        assert g["weight_decay"] == (cfg.optim.weight_decay if g["params"][0].ndim >= 2 else 0.0)
    assert made[0]["lr"] == 1.0  # the logged lr is the head's
    assert FinetuneTask(finetune_cfg()).lr_scales() == {}  # layer_decay=1: pretraining's two groups


def test_classes_come_from_the_labels_or_classes_json(tmp_path):
    from mmssl.finetune_run import resolve_classes

    def shards(name, labels):
        samples = [{"__key__": f"{name}{i}", "txt": "x", "json": {"label": y}} for i, y in enumerate(labels)]
        return write_shards(iter(samples), tmp_path / name, max_count=4)["pattern"]

    cfg = finetune_cfg()
    cfg.finetune.num_classes, cfg.finetune.classes = 0, ()
    cfg.data.train_shards = shards("names", ["dog", "cat", None, "dog", "emu"])
    resolve_classes(cfg)
    assert cfg.finetune.classes == ("cat", "dog", "emu") and cfg.finetune.num_classes == 3
    cfg.finetune.classes = ()
    cfg.data.train_shards = shards("ids", [4, 0, 2])
    resolve_classes(cfg)
    assert cfg.finetune.num_classes == 5 and cfg.finetune.classes == ()
    (tmp_path / "ids" / "classes.json").write_text(json.dumps([f"n{i}" for i in range(6)]))
    resolve_classes(cfg)
    assert cfg.finetune.num_classes == 6 and cfg.finetune.classes[4] == "n4"
    cfg.finetune.classes = ()
    cfg.data.train_shards = shards("mixed", [1, "cat"])
    with pytest.raises(ValueError, match="mixes integer labels"):
        resolve_classes(cfg)
    cfg.data.train_shards = shards("none", [None, None])
    with pytest.raises(ValueError, match="holds no labelled sample"):
        resolve_classes(cfg)


def _linear_worker(_: int) -> dict:
    from mmssl import engine, ranks
    from mmssl.train import train_step

    info = engine.init_distributed()
    out = {}
    for stage in (2, 3):
        cfg = finetune_cfg(f"engine.zero_stage={stage}", "finetune.linear=true", "optim.lr=1e-2",
                           "optim.warmup_steps=0")  # fmt: skip
        torch.manual_seed(0)
        eng = engine.Engine(FinetuneTask(cfg), cfg, info)
        batch = padded_batch(cfg, 4, eot=5, vocab=4000)
        batch.update(__key__=["a", "b", "c", "d"], label=torch.tensor([0, 1, 2, 1]), label_name=[""] * 4)
        before = {k: v.clone() for k, v in eng.gathered_state_dict().items()}
        for step in range(2):
            assert train_step(eng, batch, step=step, micro=0) is not None
        after = eng.gathered_state_dict()
        out[stage] = {
            "tower_identical": all(
                torch.equal(before[k], after[k]) for k in before if k.startswith("model.")
            ),
            "tower_tensors": sum(k.startswith("model.") for k in before),
            "head_changed": not torch.equal(before["head.linear.weight"], after["head.linear.weight"]),
            "state_numel": sum(s["exp_avg"].numel() for s in eng.optimizer.optimizer.state.values()),
        }
    ranks.shutdown()
    return out


def test_linear_finetune_leaves_every_tower_weight_bit_identical():
    (out,) = spawned(_linear_worker)
    head = 3 * 64 + 3  # the only optimizer state: the head's (ZeRO pads it to its alignment)
    for stage in (2, 3):
        r = out[stage]
        assert r["tower_tensors"] > 20 and r["tower_identical"] and r["head_changed"], (stage, r)
        assert head <= r["state_numel"] < head + 64, (stage, r)


STEPS = 6


def finetune_command(base: dict, run_dir, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mmssl.cli", "finetune", str(base["run_dir"]), "--tower", "audio",
        "--data", base["train"], "--run-dir", str(run_dir), "--nproc", "2",
        "engine.zero_stage=2", "data.num_workers=0", "data.shuffle_buffer=20", "optim.micro_batch_size=4",
        "optim.warmup_steps=2", "train.log_every=1", "train.ckpt_every=2", "train.record_keys=true",
        f"train.steps={STEPS}", "finetune.layer_decay=0.75", "finetune.label_smoothing=0.1", *extra,
    ]  # fmt: skip


@pytest.mark.distributed
def test_two_rank_finetune_killed_resumes_exactly(tmp_path_factory, tmp_path, capsys):
    """Three launches: a reference run, a run whose rank 1 is killed, its resumption (which also
    evaluates at the end); then `mmssl eval` of it in this process."""
    base = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    reference = tmp_path / "reference"
    proc = subprocess.run(
        finetune_command(base, reference), cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    faulty = tmp_path / "faulty"
    job = subprocess.Popen(finetune_command(base, faulty), cwd=REPO, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    kill_after = random.randint(3, STEPS - 1)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and job.poll() is None:
            ready = (faulty / "metrics.jsonl").is_file() and len(losses(faulty)) >= kill_after
            if ready and (pid := rank_pid(faulty, 1)):
                os.kill(pid, signal.SIGKILL)  # one rank dies; the launcher takes the other down
                break
            time.sleep(0.02)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0, "the job finished before it could be killed"
    resumed_from = int((faulty / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 0 < resumed_from < STEPS

    resumed = [*finetune_command(base, faulty, "--eval-data", base["test"]), "--resume", "latest"]
    proc = subprocess.run(resumed, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    want, got = losses(reference), losses(faulty)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (step, resumed_from)
    for rank in range(2):
        assert consumed(faulty, rank) == consumed(reference, rank), (
            f"rank {rank}, resumed from {resumed_from}"
        )
    rows = [json.loads(line) for line in (faulty / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["accuracy"]) and r["labelled"] == 4 for r in rows)
    # the scores at the end: in summary.json, eval.json and eval.html (with the confusion matrix)
    scores = json.loads((faulty / "summary.json").read_text())["eval"]["classification"]
    assert {"top1", "top5", "macro_f1", "per_class_recall"} <= set(scores)
    assert sum(map(sum, scores["confusion"])) == 24  # every held-out sample, once
    assert (
        'src="confusion.png"' in (faulty / "eval.html").read_text() and (faulty / "confusion.png").is_file()
    )

    # `mmssl eval` of the fine-tuned run shows the same figures, in this process: asked for 2 ranks, it
    # says in one line that it uses one (no more launches)
    capsys.readouterr()
    assert cli.main(["eval", str(faulty), "--nproc", "2", "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr()
    assert "macro-F1" in printed.out
    note = "mmssl eval: a fine-tuned run evaluates in one process (--nproc 2 is not used)\n"
    assert printed.err.count(note) == 1, printed.err
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())["classification"]
    assert again["confusion"] == scores["confusion"]
    assert again["macro_f1"] == pytest.approx(scores["macro_f1"])


def test_finetune_refuses_bad_inputs_in_one_line(tmp_path_factory, tmp_path, capsys):
    """Mistakes found before any rank starts: one line naming what is wrong, exit code 2."""
    base = tiny_run(tmp_path_factory.getbasetemp() / "tiny_run")
    unlabelled = write_shards(iter([{"__key__": f"u{i}", "wav": b"x", "txt": "x"} for i in range(3)]),
                              tmp_path / "unlabelled")["pattern"]  # fmt: skip
    run = str(base["run_dir"])
    cases = [
        ([str(tmp_path / "nothing"), "--data", base["train"]], "is not a run directory"),
        ([run, "--data", str(tmp_path / "none-*.tar")], "--data:"),
        ([run, "--data", unlabelled], "holds no labelled sample"),
        (
            [run, "--data", base["train"], "finetune.layer_decay=1.5"],
            "finetune.layer_decay must be in (0, 1]",
        ),
        ([run, "--data", base["train"], "model.audio=null"], "has no audio tower"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_:
            cli.main(["finetune", *args, "--tower", "audio", "--run-dir", str(tmp_path / "ft")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "ft").exists()  # nothing was started
