"""Finding a run's checkpoint and loading its model outside DeepSpeed (for eval and later export)."""

from __future__ import annotations

from pathlib import Path

from mmssl import engine
from mmssl.config import RunConfig, load_json
from mmssl.model import MultimodalModel


def resolve(path: str | Path) -> tuple[Path, Path, str | None]:
    """A run directory, its ``checkpoints/`` folder or one tagged checkpoint -> (run_dir, ckpt_dir, tag)."""
    p = Path(path)
    if (p / "checkpoints" / "latest").is_file():
        return p, p / "checkpoints", None
    if (p / "latest").is_file():
        return p.parent, p, None
    if p.is_dir() and (p.parent / "latest").is_file():
        return p.parent.parent, p.parent, p.name
    raise FileNotFoundError(f"{path} is not a run directory, a checkpoints folder or a checkpoint of one")


def load_model(path: str | Path) -> tuple[MultimodalModel, RunConfig, Path]:
    """fp32 model of any ZeRO stage's checkpoint, with the run config saved beside it."""
    run_dir, ckpt_dir, tag = resolve(path)
    config = run_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json to rebuild the model from")
    cfg = load_json(config)
    # keys of the whole Task: "model.<tower>..." and "contrastive.logit_scale..."
    state = engine.consolidated_state_dict(ckpt_dir, tag)
    model = MultimodalModel(cfg.model)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model, cfg, run_dir
