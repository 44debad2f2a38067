"""``mmssl export``: a trained model as consolidated fp32 safetensors with its config, and, when the
image and text towers are open_clip-compatible, an open_clip checkpoint.

Layout written under the output folder::

    model.safetensors   the model's state dict (every tower) + "logit_scale.<pair>" (log scales)
                        + "logit_bias.<pair>" (SigLIP pairs)
    config.json         the run config (enough to rebuild the model: ``mmssl.api.load(OUT)``)
    export.json         what was exported, from where, and the open_clip verdict
    hf_text/            a Hugging Face text tower's config and tokenizer files (its weights are in
                        model.safetensors), which config.json's model.text.hf_path names
    open_clip/          open_clip_config.json + open_clip_model.safetensors, for
                        ``open_clip.create_model("local-dir:OUT/open_clip")``

The image and text towers are named like open_clip's VisionTransformer and TextTransformer (same
blocks, GELU, LayerNorm, class-token pooling, projection matrices), so the open_clip state dict is a
renaming: image tower -> ``visual.*``, text tower -> the CLIP model's top level, plus ``logit_scale``
(the image-text pair's learned log scale) and, when that pair was trained with SigLIP, ``logit_bias``
(open_clip's SigLIP models carry one: ``init_logit_bias`` in the config). It is compatible only when both towers exist and the text
tower is causal (CLIP's), since open_clip pools the end-of-text token of a causal transformer.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mmssl.checkpoint import (
    EXPORT_WEIGHTS,
    HF_TEXT_DIR,
    LOGIT_BIAS_PREFIX,
    LOGIT_SCALE_PREFIX,
    contiguous_copy,
    load,
)
from mmssl.config import RunConfig, save_json
from mmssl.encoders.hf_text import WEIGHT_FILES

OPEN_CLIP_DIR = "open_clip"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def open_clip_incompatibility(cfg: RunConfig) -> str | None:
    """Why the towers cannot be an open_clip CLIP model, or None when they can."""
    m = cfg.model
    if m.image is None or m.text is None:
        return "open_clip's CLIP needs both an image and a text tower"
    for name in ("image", "text"):
        if getattr(m, name).kind != "native":
            return f"the {name} tower is a {getattr(m, name).kind} model (model.{name}.kind); open_clip's export maps mmssl's native towers only"
    if not m.text.causal:
        return "the text tower is bidirectional (model.text.causal=false); open_clip's is causal"
    return None


def open_clip_config(cfg: RunConfig, logit_bias: float | None = None) -> dict[str, Any]:
    """The model and preprocessing config open_clip reads from ``open_clip_config.json``; a SigLIP
    image-text pair's bias makes open_clip build its model with a ``logit_bias``."""
    image, text = cfg.model.image, cfg.model.text
    assert image is not None and text is not None
    model_cfg = {
        "embed_dim": cfg.model.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {
            "image_size": image.image_size,
            "patch_size": image.patch_size,
            "width": image.width,
            "layers": image.depth,
            "head_width": image.width // image.heads,
            "mlp_ratio": image.mlp_ratio,
        },
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.depth,
            "mlp_ratio": text.mlp_ratio,
            # the end-of-text id is the highest id open_clip's tokenizer emits
            "pool_type": "argmax",
        },
    }
    # data_pipelines.decode_image in evaluation: RGB, the centred square resized with bicubic (open_clip's
    # shorter side resized, then centre crop), mean/std 0.5
    preprocess_cfg = {
        "size": image.image_size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    if logit_bias is not None:
        model_cfg["init_logit_bias"] = logit_bias
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


# The one renaming between our towers and open_clip CLIP's state dict, both ways (export writes with
# it, mmssl/pretrained.py reads open_clip checkpoints with its inverse)
OPEN_CLIP_SCALARS = ("logit_scale", "logit_bias")


def open_clip_key(key: str) -> str | None:
    """Our model's key -> open_clip's: ``image.*`` -> ``visual.*``, ``text.*`` -> top level; None for
    towers open_clip has no place for (audio)."""
    if key.startswith("image."):
        return f"visual.{key.removeprefix('image.')}"
    if key.startswith("text."):
        return key.removeprefix("text.")
    return None


def mmssl_key(key: str) -> str | None:
    """The inverse of :func:`open_clip_key`; None for open_clip's scalars (``logit_scale``/``logit_bias``)."""
    if key in OPEN_CLIP_SCALARS:
        return None
    if key.startswith("visual."):
        return f"image.{key.removeprefix('visual.')}"
    return f"text.{key}"


def open_clip_state(
    model_state: dict[str, Tensor], log_logit_scale: float | None, logit_bias: float | None = None
) -> dict[str, Tensor]:
    """Our model's state dict -> open_clip CLIP's (image tower under ``visual.``, text tower at the top)."""
    out = {name: v for k, v in model_state.items() if (name := open_clip_key(k)) is not None}
    # open_clip starts logit_scale at log(1/0.07); an untrained image-text pair keeps that value
    value = math.log(1 / 0.07) if log_logit_scale is None else log_logit_scale
    out["logit_scale"] = torch.tensor(value, dtype=torch.float32)
    if logit_bias is not None:
        out["logit_bias"] = torch.tensor(logit_bias, dtype=torch.float32)
    return out


def copy_hf_files(cfg: RunConfig, dest: Path) -> RunConfig:
    """Copy a Hugging Face text tower's config and tokenizer files (not its weights: the export holds
    them) to ``dest``, so the export rebuilds without the original directory; the config, pointed there."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in Path(cfg.model.text.hf_path).iterdir():
        if (
            item.is_file()
            and item.name not in WEIGHT_FILES
            and not item.name.endswith((".safetensors", ".bin"))
        ):
            shutil.copy2(item, dest / item.name)
    cfg = copy.deepcopy(cfg)
    cfg.model.text.hf_path = str(dest.resolve())
    return cfg


def teacher_towers(path: str | Path) -> dict[str, Tensor]:
    """The EMA teacher's towers (``objectives.distill``) saved in a run's checkpoint, keyed as the model's
    state dict (``image.*``, ...)."""
    from mmssl.checkpoint import is_export, resolve
    from mmssl.ds_checkpoint import saved_teacher

    if is_export(path):
        raise ValueError(f"--teacher: {path} is an export folder; the teacher lives in a run's checkpoints")
    _, ckpt_dir, tag = resolve(path)
    return saved_teacher(ckpt_dir, tag)


def export(path: str | Path, out_dir: str | Path, *, teacher: bool = False) -> dict[str, Any]:
    """Write the export folder for a run / checkpoint (any ZeRO stage) / export; returns a summary. With
    ``teacher`` the distilled towers are the EMA teacher's (the others, and the logit scales, the student's)."""
    ckpt = load(path)
    towers = teacher_towers(path) if teacher else {}
    if teacher:
        unexpected = ckpt.model.load_state_dict(towers, strict=False).unexpected_keys
        assert not unexpected, unexpected  # the teacher's towers are the model's, by construction
        ckpt.source += " (EMA teacher)"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = contiguous_copy(ckpt.model.state_dict())
    scales = {f"{LOGIT_SCALE_PREFIX}{k}": torch.tensor(v) for k, v in ckpt.log_logit_scales.items()}
    scales |= {f"{LOGIT_BIAS_PREFIX}{k}": torch.tensor(v) for k, v in ckpt.logit_biases.items()}
    save_file(
        {**state, **scales}, str(out / EXPORT_WEIGHTS), metadata={"format": "pt", "source": ckpt.source}
    )
    cfg = ckpt.cfg
    if cfg.model.text is not None and cfg.model.text.kind == "hf":
        cfg = copy_hf_files(cfg, out / HF_TEXT_DIR)
    save_json(cfg, out / "config.json")

    summary: dict[str, Any] = {
        "source": ckpt.source,
        "out_dir": str(out),
        "towers": list(ckpt.cfg.model.modalities),
        "embed_dim": ckpt.cfg.model.embed_dim,
        "parameters": sum(v.numel() for v in state.values()),
        "logit_scales": {k: math.exp(v) for k, v in ckpt.log_logit_scales.items()},
        "logit_biases": ckpt.logit_biases,
    }
    if teacher:
        summary["teacher_towers"] = sorted({k.split(".", 1)[0] for k in towers})
    reason = open_clip_incompatibility(ckpt.cfg)
    if reason is None:
        oc_dir = out / OPEN_CLIP_DIR
        oc_dir.mkdir(exist_ok=True)
        log_scale, bias = ckpt.log_logit_scales.get("image_text"), ckpt.logit_biases.get("image_text")
        (oc_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config(ckpt.cfg, bias), indent=2) + "\n")
        save_file(
            open_clip_state(state, log_scale, bias),
            str(oc_dir / OPEN_CLIP_WEIGHTS),
            metadata={"format": "pt"},
        )
        summary["open_clip"] = {"dir": str(oc_dir), "model_name": f"local-dir:{oc_dir}"}
        if log_scale is None:
            summary["open_clip"]["note"] = (
                "no image-text pair was trained: logit_scale is open_clip's initial value"
            )
    else:
        summary["open_clip"] = {"skipped": reason}
    (out / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_export_summary(summary: dict[str, Any]) -> str:
    out = summary["out_dir"]
    lines = [
        f"exported {summary['source']} -> {out}",
        f"  {EXPORT_WEIGHTS}: {summary['parameters'] / 1e6:.2f}M fp32 parameters, towers "
        f"{', '.join(summary['towers'])}, embedding dim {summary['embed_dim']}; config.json; export.json",
    ]
    oc = summary["open_clip"]
    if "skipped" in oc:
        lines.append(f"  open_clip: not written ({oc['skipped']})")
    else:
        lines.append(
            f"  {OPEN_CLIP_DIR}/: open_clip.create_model({oc['model_name']!r}) loads the image and text towers"
        )
        if "note" in oc:
            lines.append(f"  note: {oc['note']}")
    lines.append(f"  load it back: mmssl.api.load({out!r})")
    return "\n".join(lines)
