"""A DeepSpeed checkpoint folder, read without importing DeepSpeed: its ``latest`` pointer, the layout
mmssl records beside each tag (``mmssl.json``), the EMA teacher in its client state, and its conversion
to the universal format (DeepSpeed's converter, run in a subprocess). Writing and loading one is
:class:`mmssl.engine.Engine`'s; ``engine.consolidated_state_dict`` reads its weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

HOLD_SAVE_ENV = "MMSSL_FAULT_HOLD_SAVE_AT"
TEACHER_KEY = "distill_teacher"  # the EMA teacher's state in a checkpoint's client state


def saved_teacher(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, Tensor]:
    """The EMA teacher's weights ``{"<modality>.<name>": tensor}`` (fp32, whole) saved in a checkpoint,
    read from rank 0's model-states file (every rank saves the same teacher)."""
    tag = tag or latest_tag(ckpt_dir)
    folder = Path(ckpt_dir) / tag
    files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states file")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    if TEACHER_KEY not in state:
        raise ValueError(f"{folder} holds no EMA teacher: the run was trained without objectives.distill")
    return state[TEACHER_KEY]["towers"]


def hold_for_fault_drill(folder: Path, step: int, rank: int) -> None:
    """A fault drill for the tests: with ``MMSSL_FAULT_HOLD_SAVE_AT=<step>`` in the environment, the save
    of that step stops after this rank wrote its part, before ``latest`` moves: it marks
    ``<folder>/held_rank<r>`` and waits (up to ten minutes) to be killed, so a kill is sure to land
    inside a save."""
    if os.environ.get(HOLD_SAVE_ENV) != str(step):
        return
    (folder / f"held_rank{rank}").touch()
    time.sleep(600)
    raise RuntimeError(f"{HOLD_SAVE_ENV}={step}: the fault drill held the save for ten minutes, unkilled")


def latest_tag(ckpt_dir: str | Path) -> str:
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no 'latest' checkpoint pointer")
    return latest.read_text().strip()


def saved_world_size(ckpt_dir: str | Path, tag: str) -> int | None:
    """The number of ranks that wrote a checkpoint (None for one written elsewhere)."""
    layout = Path(ckpt_dir) / tag / "mmssl.json"
    return json.loads(layout.read_text())["world_size"] if layout.is_file() else None


def to_universal(ckpt_dir: str | Path, tag: str) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (loadable by any number of ranks); returns
    the new tag. Converted once; the original stays."""
    out_tag = f"{tag}_universal"
    out = Path(ckpt_dir) / out_tag
    if not (out / "zero").is_dir():
        command = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
            "--input_folder", str(Path(ckpt_dir) / tag), "--output_folder", str(out),
            "--num_extract_workers", "1", "--num_merge_workers", "1",
            # mmssl's checkpoints carry no Megatron-style universal_checkpoint_info: add the default one
            "--inject_missing_state",
        ]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"converting {ckpt_dir}/{tag} to a universal checkpoint failed:\n{proc.stderr[-2000:]}"
            )
    rename_legacy_params(out / "zero")
    return out_tag


def rename_legacy_params(zero_dir: Path) -> None:
    """A universal checkpoint holds one folder per parameter, named as the parameter was when it was
    saved, and DeepSpeed looks each one up by today's name: rename the folders of parameters renamed
    since (the masked patch objectives' decoder, now a shared ``PatchDecoder``; their module state-dict
    keys are renamed on load by a pre-hook with the same mapping)."""
    from mmssl.objectives.masked_patches import legacy_decoder_key

    for folder in sorted(zero_dir.iterdir()):
        objective, dot, key = folder.name.partition(".")
        if objective in ("masked_image", "masked_audio") and dot:
            new = f"{objective}.{legacy_decoder_key(key)}"
            if new != folder.name:
                folder.rename(zero_dir / new)
