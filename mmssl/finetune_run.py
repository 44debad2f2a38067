"""A fine-tuning run from end to end: its config from a pretrained run (:func:`finetune_config`, with
the classes found in the labels), the trainer (:class:`FinetuneTrainer`: pretraining's, building
:class:`mmssl.finetune.FinetuneTask`), and the evaluation of the classifier on held-out shards
(:func:`evaluate`), at the end of training and from ``mmssl eval`` (:func:`evaluate_checkpoint`).

Axis legend: N samples, C classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipelines import label_census
from data_pipelines.remote import mask
from mmssl import checkpoint, data, flops
from mmssl.config import ObjectivesConfig, RunConfig, apply_overrides
from mmssl.eval import classify, labels, report
from mmssl.eval.embeddings import Embeddings
from mmssl.eval.zeroshot import find_classes
from mmssl.finetune import FinetuneTask, flops_per_sample
from mmssl.finetune_config import FinetuneConfig
from mmssl.runlog import Work
from mmssl.train import Trainer, on_main_rank, to_device


def finetune_config(
    run: str,
    *,
    shards: str,
    tower: str,
    eval_shards: str = "",
    linear: bool = False,
    run_dir: str | None = None,
    overrides: tuple[str, ...] | list[str] = (),
) -> RunConfig:
    """The config of fine-tuning ``tower`` of ``run`` (a run directory, checkpoint or export) on
    ``shards``: the pretrained run's model, data and training settings, its tower's weights through
    ``model.<tower>.init_from``, no pretraining objective, then ``overrides``; the classes come from
    ``finetune.classes``, classes.json by the shards, or the labels (:func:`resolve_classes`)."""
    cfg, folder = checkpoint.find_config(run)
    if cfg.finetune is not None:
        raise ValueError(f"{run} is a fine-tuned run: fine-tune from a pretrained run (its source was "
                         f"{cfg.finetune.source})")  # fmt: skip
    model = cfg.model
    model.init_from = None
    for name in model.modalities:
        tower_cfg = getattr(model, name)
        tower_cfg.init_from, tower_cfg.lock, tower_cfg.unlocked_groups = None, False, 0
    if tower in model.modalities:
        getattr(model, tower).init_from = str(run)
    cfg.objectives = ObjectivesConfig()
    cfg.data.train_shards, cfg.data.sources = shards, ()
    cfg.data.eval_shards, cfg.data.eval_layout = eval_shards, ""
    cfg.train.inject_nonfinite_at = ()
    cfg.train.eval_at_end = bool(eval_shards)  # scored when asked, whatever the pretrained run skipped
    cfg.run_dir = run_dir or f"{folder}-finetune-{tower}"
    cfg.finetune = FinetuneConfig(tower=tower, source=str(run), linear=linear)
    apply_overrides(cfg, list(overrides))
    if cfg.finetune is None or cfg.finetune.tower != tower:
        raise ValueError("finetune.tower is set by --tower")
    if getattr(cfg.model, tower) is None:
        raise ValueError(
            f"--tower {tower}: {run} has no {tower} tower (it has {', '.join(model.modalities)})"
        )
    if not cfg.finetune.num_classes:
        resolve_classes(cfg)
    return cfg.validate()


def resolve_classes(cfg: RunConfig) -> None:
    """Set ``finetune.num_classes`` (and ``classes`` for names) from the training labels, read without
    decoding any media: ids count up to the largest; names are ``finetune.classes``, else classes.json
    by the shards, else their sorted distinct names. A split without labels, with labels of both
    kinds, or with a name or id its class list lacks is a ValueError naming it."""
    f, spec = cfg.finetune, cfg.data.train_shards
    census = label_census(spec, layout=cfg.data.layout)
    ids, names = census["integer"], census["name"]
    given, source = (list(f.classes), "finetune.classes") if f.classes else find_classes(spec)
    if ids and names:
        raise ValueError(
            f"data.train_shards={mask(spec)} mixes integer labels ({min(ids)}, ...) and class names "
            f"({sorted(names)[0]!r}, ...): give every sample the same kind of label"
        )
    if not ids and not names:
        raise ValueError(
            f"data.train_shards={mask(spec)} holds no labelled sample ({census['absent']} without a label, "
            f"{census['bad']} with a bad one): fine-tuning needs a json 'label' or a cls file"
        )
    if names:
        classes = given or sorted(names)
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(
                f"data.train_shards has the class name {unknown[0]!r}, which {source} does not list"
            )
        f.classes, f.num_classes = tuple(classes), len(classes)
        return
    top = max(ids)
    if given is not None and top >= len(given):
        raise ValueError(f"data.train_shards has the label {top}, but {source} names {len(given)} classes")
    f.classes = tuple(given or ())
    f.num_classes = len(given) if given else top + 1


class FinetuneTrainer(Trainer):
    """Pretraining's trainer around a :class:`FinetuneTask`, evaluated as a classifier."""

    def build_task(self) -> nn.Module:
        return FinetuneTask(self.cfg, rank=self.info.rank, world_size=self.info.world_size)

    def headline(self) -> str:
        f = self.cfg.finetune
        how = "linear: the tower locked" if f.linear else f"layer decay {f.layer_decay:g}"
        start = getattr(self.cfg.model, f.tower).init_from
        what = f"the {f.tower} tower of {start}" if start else f"the {f.tower} tower from scratch"
        return f"fine-tuning {what} ({f.num_classes} classes, {how}, label smoothing {f.label_smoothing:g})"

    def work_counter(self, global_batch: int) -> Work:
        cfg = self.cfg
        tokens = {m: n for m, n in flops.tower_tokens(cfg).items() if m == cfg.finetune.tower}
        return Work(lambda text: flops_per_sample(cfg, text), tokens)

    def evaluate(self) -> tuple[dict | None, Exception | None, str | None]:
        cfg, info, eng = self.cfg, self.info, self.eng
        task = self.task
        if eng.zero_stage == 3:  # each rank holds a part of each weight: rank 0 gets a whole copy
            state = eng.gathered_state_dict()
            task = None
            if state is not None:
                task = FinetuneTask(cfg)
                task.load_state_dict(state)
                task = task.to(device=info.device, dtype=eng.dtype)
        return on_main_rank(
            lambda: evaluate(
                task, cfg, cfg.data.eval_shards, Path(cfg.run_dir), device=info.device, dtype=eng.dtype,
                progress=self.log.interactive,
            ),
            info,
        )  # fmt: skip


def finetune(cfg: RunConfig, *, resume: str | None = None) -> dict[str, Any]:
    """Fine-tune on the ranks the launcher started (or one), evaluate at the end, return the summary."""
    trainer = FinetuneTrainer(cfg, resume=resume)
    trainer.run()
    return trainer.finish()


@torch.no_grad()
def predict(
    task: FinetuneTask,
    cfg: RunConfig,
    shards: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> Embeddings:
    """Logits of every sample of ``shards`` (read with ``data.eval_layout``), in key order, held as
    :class:`Embeddings` (``emb[tower]``: ``[N, C]`` logits) so that mmssl.eval.labels maps their names."""
    was_training = task.training
    task.eval()
    m = task.modality
    logits, ids, keys, names, urls, present = [], [], [], [], [], []
    loader = data.loader(cfg, train=False, shards=shards)
    for batch in loader if not progress else _bar(loader):
        batch = to_device(batch, device, dtype)
        logits.append(task.logits(batch).float().cpu())
        ids.append(batch["label"].cpu())
        rows = len(batch["__key__"])
        present.append(batch["present"].get(m, torch.ones(rows, dtype=torch.bool)).cpu())
        keys += batch["__key__"]
        names += batch.get("label_name", [""] * rows)
        urls += batch.get("__url__", [""] * rows)
    task.train(was_training)
    if not keys:
        raise ValueError(f"the evaluation data {mask(shards)} holds no samples")
    out = Embeddings(
        emb={m: torch.cat(logits)}, labels=torch.cat(ids), keys=keys, present={m: torch.cat(present)},
        label_names=names, shards=urls,
    )  # fmt: skip
    return out.sorted_by_key()


def _bar(loader: Any) -> Any:
    from tqdm import tqdm

    return tqdm(loader, desc="classify", unit="batch", leave=False)


def evaluate(
    task: FinetuneTask,
    cfg: RunConfig,
    shards: str,
    out_dir: Path,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    metrics: Path | None = None,
) -> dict:
    """Score the classifier on ``shards``: eval.json, confusion.png, loss.png and eval.html in
    ``out_dir``, the table on the terminal; returns the results."""
    f = cfg.finetune
    test = predict(task, cfg, shards, device=device, dtype=dtype, progress=progress)
    kind = labels.kind(test, mask(shards))
    if kind == "name" and not f.classes:
        raise ValueError(
            f"{mask(shards)} labels its samples with class names, but the classifier was trained on integer "
            "ids without names (finetune.classes is empty)"
        )
    test, _, _ = labels.resolve(test, list(f.classes) or None, source="finetune.classes", where=mask(shards))
    rows = test.mask(task.modality) & (test.labels >= 0)
    scores = classify.score_classification(test.emb[task.modality][rows], test.labels[rows], list(f.classes))
    results = {"shards": mask(shards), "tower": f.tower, "source": f.source, "classification": scores}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    confusion = report.confusion_png(scores["confusion"], scores["classes"], out_dir / "confusion.png")
    loss = report.loss_curves_png(
        report.read_metrics(metrics or out_dir / "metrics.jsonl"), out_dir / "loss.png"
    )
    report.classification_html(
        results, out_dir / "eval.html", confusion=confusion.name, loss_png=loss.name if loss else None
    )
    print(classify.format_classification(scores), flush=True)
    return results


def evaluate_checkpoint(
    path: str, shards: str, out_dir: Path, *, device: torch.device, progress: bool
) -> dict:
    """``mmssl eval`` of a fine-tuned run (its directory, checkpoints folder or one checkpoint)."""
    state, cfg, run_dir, source = checkpoint.task_state(path)
    task = FinetuneTask(cfg)
    task.load_state_dict(state)
    print(
        f"evaluating the fine-tuned {cfg.finetune.tower} classifier of {source} on {mask(shards)}", flush=True
    )
    return evaluate(
        task.to(device),
        cfg,
        shards,
        out_dir,
        device=device,
        progress=progress,
        metrics=run_dir / "metrics.jsonl",
    )
