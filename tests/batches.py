"""A random trimodal batch for tests that drive the task or the engine directly (no loader)."""

import torch

from mmssl.config import EOT_TOKEN_ID, SOT_TOKEN_ID


def padded_batch(cfg, rows: int, *, eot: int, vocab: int) -> dict:
    """``rows`` samples of every tower, all present; captions of random ids below ``vocab`` with the end
    token at ``eot`` and padding after it. Draws text, then images, then audio from torch's generator."""
    m = cfg.model
    text = torch.randint(1, vocab, (rows, m.text.context_length))
    text[:, 0], text[:, eot], text[:, eot + 1 :] = SOT_TOKEN_ID, EOT_TOKEN_ID, 0
    return {
        "image": torch.randn(rows, 3, m.image.image_size, m.image.image_size),
        "text": text,
        "audio": torch.randn(rows, m.audio.n_mels, m.audio.n_frames),
        "present": {k: torch.ones(rows, dtype=torch.bool) for k in ("image", "text", "audio")},
    }
