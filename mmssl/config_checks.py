"""What the config modules share (``mmssl.config``, ``mmssl.objectives_config``): the modality names and
the positivity check. A leaf: it imports nothing of mmssl, so neither config module imports the other's
back."""

from __future__ import annotations

from typing import Any

MODALITIES = ("image", "text", "audio")


def positive(cfg: Any, path: str, *names: str) -> None:
    """Raise ``ValueError`` naming ``path.name`` for each of ``names`` on ``cfg`` that is not > 0."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"{path}.{name} must be > 0, got {value!r}")
