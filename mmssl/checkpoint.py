"""Finding a trained model and loading it outside DeepSpeed (for eval, embed, export and the API).

A model is found from any of: a run directory, its ``checkpoints/`` folder, one tagged checkpoint in
it (DeepSpeed, any ZeRO stage: consolidated to fp32 in this process), or a folder written by
``mmssl export`` (``model.safetensors`` + ``config.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mmssl.config import RunConfig, load_json
from mmssl.ds_checkpoint import latest_tag
from mmssl.model import MultimodalModel

# the model's state dict plus "logit_scale.<pair>" (log scales) and "logit_bias.<pair>" (SigLIP pairs)
EXPORT_WEIGHTS = "model.safetensors"
LOGIT_SCALE_PREFIX = "logit_scale."
LOGIT_BIAS_PREFIX = "logit_bias."
HF_TEXT_DIR = "hf_text"  # an export's copy of a Hugging Face text tower's config and tokenizer


@dataclass
class Checkpoint:
    model: MultimodalModel
    cfg: RunConfig
    run_dir: Path  # where the run's files are (config.json, metrics.jsonl)
    log_logit_scales: dict[str, float]  # pair ("image_text") -> log logit scale, clamped as in training
    source: str  # what was loaded, for reports
    logit_biases: dict[str, float] = field(default_factory=dict)  # SigLIP pairs' learned biases


def is_export(path: str | Path) -> bool:
    p = Path(path)
    return (p / EXPORT_WEIGHTS).is_file() and (p / "config.json").is_file()


def resolve(path: str | Path) -> tuple[Path, Path, str | None]:
    """A run directory, its ``checkpoints/`` folder or one tagged checkpoint -> (run_dir, ckpt_dir, tag)."""
    p = Path(path)
    if (p / "checkpoints" / "latest").is_file():
        return p, p / "checkpoints", None
    if (p / "latest").is_file():
        return p.parent, p, None
    if p.is_dir() and (p.parent / "latest").is_file():
        return p.parent.parent, p.parent, p.name
    raise FileNotFoundError(
        f"{path} is not a run directory, a checkpoints folder or a checkpoint of one, nor an `mmssl export` folder"
    )


def _config(folder: Path) -> RunConfig:
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json to rebuild the model from")
    return load_json(config)


def find_config(path: str | Path) -> tuple[RunConfig, Path]:
    """The run config of a run, checkpoint or export folder, and the run's folder (no weights read)."""
    p = Path(path)
    folder = p if is_export(p) else resolve(p)[0]
    return _config(folder), folder


def task_state(path: str | Path) -> tuple[dict[str, Tensor], RunConfig, Path, str]:
    """fp32 weights of the whole training task (``model.*``, ``contrastive.logit_scale.*``, objectives'
    heads) of a DeepSpeed checkpoint of any ZeRO stage, with the run config saved beside it."""
    from mmssl import engine  # imports DeepSpeed: only when a DeepSpeed checkpoint is read

    run_dir, ckpt_dir, tag = resolve(path)
    cfg = _config(run_dir)
    tag = tag or latest_tag(ckpt_dir)
    return engine.consolidated_state_dict(ckpt_dir, tag), cfg, run_dir, f"{ckpt_dir / tag}"


def split_task_state(state: dict[str, Tensor], cfg: RunConfig) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Task state -> (the model's state dict, pair -> log logit scale clamped at max_logit_scale)."""
    model_state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    ceiling = math.log(cfg.objectives.contrastive.max_logit_scale)
    prefix = "contrastive.logit_scale."
    scales = {
        k.removeprefix(prefix): min(float(v.detach()), ceiling)
        for k, v in state.items()
        if k.startswith(prefix)
    }
    return model_state, scales


def load(path: str | Path) -> Checkpoint:
    """The fp32 model of a run, checkpoint or export folder, in eval mode on the CPU."""
    p = Path(path)
    if is_export(p):
        from safetensors.torch import load_file

        cfg = _config(p)
        if (
            p / HF_TEXT_DIR
        ).is_dir() and cfg.model.text is not None:  # the export's own copy (it may have moved)
            cfg.model.text.hf_path = str(p / HF_TEXT_DIR)
        tensors = load_file(str(p / EXPORT_WEIGHTS))
        scales = _with_prefix(tensors, LOGIT_SCALE_PREFIX)
        biases = _with_prefix(tensors, LOGIT_BIAS_PREFIX)
        extras = (LOGIT_SCALE_PREFIX, LOGIT_BIAS_PREFIX)
        model_state = {k: v for k, v in tensors.items() if not k.startswith(extras)}
        run_dir, source = p, f"{p} (exported)"
    else:
        state, cfg, run_dir, source = task_state(p)
        if cfg.finetune is not None:
            raise ValueError(
                f"{path} is a fine-tuned {cfg.finetune.tower} classifier, not a pretrained model: `mmssl eval` "
                f"scores it; embed, export and init_from take the pretrained run ({cfg.finetune.source})"
            )
        model_state, scales = split_task_state(state, cfg)
        biases = _with_prefix(state, f"contrastive.{LOGIT_BIAS_PREFIX}")
    model = MultimodalModel(cfg.model)
    model.load_state_dict(model_state)
    model.eval()
    return Checkpoint(
        model=model, cfg=cfg, run_dir=run_dir, log_logit_scales=scales, source=source, logit_biases=biases
    )


def _with_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, float]:
    """``{prefix + pair: one-element tensor}`` entries of a state dict -> ``{pair: value}``."""
    return {k.removeprefix(prefix): float(v.detach()) for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def contiguous_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Tensors that own their memory (ZeRO consolidation returns views of flat buffers; safetensors
    refuses tensors that share storage)."""
    return {
        k: (v.float() if v.is_floating_point() else v).detach().contiguous().clone() for k, v in state.items()
    }
