"""Stack decoded samples into a batch with per-modality presence masks.

A decoded sample is a dict with `__key__`, `__url__` (its shard), `label` (a class id, a class name, or
None / -1 when it has none) and, for every modality the stream was configured with, either a tensor or
None (the sample lacks that modality). A missing
modality becomes a zero row and `present[modality] = False`, so every batch has the same keys and
shapes and the towers can mask the absent rows out.

Batch format (B samples):
    __key__   list[str]
    __url__   list[str]                   the shard of each sample ("" when not known)
    label     LongTensor [B]              class id; -1 where a sample has no label or a class name
    label_name list[str]                  class name; "" where a sample has none (training ignores both)
    image     FloatTensor [B, 3, H, W]    )
    text      LongTensor [B, L]           ) only the configured modalities (L may be trimmed)
    audio     FloatTensor [B, M, F]       )
    image_view, audio_view                  a second view of the same rows, where the stream decodes one
                                            (StreamConfig.views); absent with the modality: present[...]
    present   {modality: BoolTensor [B]}
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch

MODALITIES = ("image", "text", "audio")
VIEWS = ("image_view", "audio_view")


def collate(
    samples: Sequence[Mapping[str, Any]],
    *,
    templates: Mapping[str, torch.Tensor] | None = None,
    trim_text: int | None = None,
) -> dict[str, Any]:
    """Decoded samples -> batch dict (format in the module docstring).

    `templates` gives, per modality, a tensor of the per-sample shape and dtype; it is only needed when
    every sample of a batch lacks that modality (otherwise the first present sample sets the shape).
    With `trim_text` (a minimum length), text is cut after the batch's last non-padding token: `L`
    becomes the longest caption's length, but not less than `trim_text` (see `trim_padding`).
    """
    if not samples:
        raise ValueError("collate got an empty list of samples")
    labels = [s.get("label") for s in samples]
    batch: dict[str, Any] = {
        "__key__": [str(s["__key__"]) for s in samples],
        "__url__": [str(s.get("__url__") or "") for s in samples],
        "label": torch.tensor([y if isinstance(y, int) else -1 for y in labels], dtype=torch.long),  # [B]
        "label_name": [y if isinstance(y, str) else "" for y in labels],
        "present": {},
    }
    for modality in MODALITIES + VIEWS:
        if not any(modality in s for s in samples):
            continue  # the stream was not configured with this modality
        rows = [s.get(modality) for s in samples]
        template = next((r for r in rows if r is not None), None)
        if template is None:
            template = (templates or {}).get(modality)
            if template is None:
                raise ValueError(
                    f"no sample in batch {batch['__key__'][:3]}... has {modality!r} and no template"
                )
        for key, row in zip(batch["__key__"], rows, strict=True):
            if row is not None and (row.shape != template.shape or row.dtype != template.dtype):
                raise ValueError(
                    f"sample {key!r}: {modality} has shape {tuple(row.shape)} {row.dtype}, "
                    f"expected {tuple(template.shape)} {template.dtype} like the rest of the batch"
                )
        zero = torch.zeros_like(template)
        batch[modality] = torch.stack([zero if r is None else r for r in rows])  # [B, ...]
        if modality == "text" and trim_text is not None:
            batch["text"] = trim_padding(batch["text"], trim_text)  # [B, L'] with L' <= L
        if modality in MODALITIES:  # a view is present where its modality is
            batch["present"][modality] = torch.tensor([r is not None for r in rows], dtype=torch.bool)  # [B]
    return batch


def trim_padding(tokens: torch.Tensor, min_length: int = 1) -> torch.Tensor:
    """``[B, L] -> [B, L']``: drop the trailing columns that are padding (id 0) in every row, keeping at
    least ``min_length``. A text tower that masks padding keys, or attends causally and pools at the
    end token (the last non-padding token), gives every kept position the same output as before."""
    used = torch.nonzero(tokens.any(dim=0))
    length = int(used[-1]) + 1 if len(used) else 0
    return tokens[:, : max(length, min(min_length, tokens.shape[1]))]
