"""A small Python API over a trained model: load a run, a checkpoint or an export folder, then embed
images, texts or audio clips given as files or tensors. Files go through the same decoding and
transforms as the evaluation stream (``data_pipelines.transforms``, the specs and tokenizer of
``mmssl.data``), so an embedding here equals the one ``mmssl eval``/``mmssl embed`` compute.

    from mmssl.api import load
    m = load("runs/demo")                               # or a checkpoint, or an `mmssl export` folder
    images = m.embed_images(["a.png", "b.png"])         # [2, E], L2-normalised
    texts = m.embed_texts(["the number seven"])         # [1, E]
    audio = m.embed_audio(["seven.wav"])                # files; or waveforms with sample_rate=
    images @ texts.T                                    # cosine similarities

Axis legend: B items, E embedding dim, S image side, M mel bins, F frames, T audio samples, L tokens.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from data_pipelines import audio_to_logmel, decode_audio, decode_image
from mmssl import data
from mmssl.checkpoint import Checkpoint
from mmssl.checkpoint import load as load_checkpoint

PathLike = str | Path


def _read(item: PathLike | bytes) -> bytes:
    if isinstance(item, bytes):
        return item
    path = Path(item)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path.read_bytes()


class Embedder:
    """A loaded model with its preprocessing. Every ``embed_*`` returns ``[B, E]`` float32 on the CPU."""

    def __init__(self, ckpt: Checkpoint, *, device: torch.device | str = "cpu", batch_size: int = 64):
        self.checkpoint = ckpt
        self.cfg = ckpt.cfg
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = ckpt.model.to(self.device).eval()
        specs = data.stream_config(self.cfg, train=False, shards="-")
        self.image_spec, self.audio_spec = specs.image, specs.audio
        self.tokenizer = data.tokenizer(self.cfg)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.model.modalities

    def _need(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(f"this model has no {modality} tower (it has {', '.join(self.modalities)})")

    # ---------------------------------------------------------------------------------- preprocess

    def preprocess_images(self, items: Sequence[PathLike | bytes | Image.Image] | Tensor) -> Tensor:
        """Files, encoded bytes or PIL images -> ``[B, 3, S, S]``; a float tensor is taken as already
        preprocessed (``[B, 3, S, S]`` or one ``[3, S, S]``)."""
        self._need("image")
        if isinstance(items, Tensor):
            return items if items.dim() == 4 else items[None]
        out = []
        for item in items:
            if isinstance(item, Image.Image):
                buffer = io.BytesIO()
                item.save(buffer, format="PNG")  # lossless: the same pixels as a PNG file of it
                item = buffer.getvalue()
            out.append(decode_image(_read(item), self.image_spec, train=False))  # [3, S, S]
        return torch.stack(out)

    def preprocess_audio(
        self, items: Sequence[PathLike | bytes | Tensor | np.ndarray] | Tensor, sample_rate: int | None = None
    ) -> Tensor:
        """Audio files or bytes, or mono waveforms ``[T]`` (a list, or a ``[B, T]`` tensor) at
        ``sample_rate`` -> normalised log-mel ``[B, M, F]``; a ``[B, M, F]`` tensor is taken as is."""
        self._need("audio")
        if isinstance(items, Tensor) and items.dim() == 3:
            return items
        out = []
        for item in items:
            if isinstance(item, str | Path | bytes):
                wave, sr = decode_audio(_read(item))  # [T]
            else:
                if sample_rate is None:
                    raise ValueError("waveforms need sample_rate= (files carry their own)")
                wave, sr = torch.as_tensor(item, dtype=torch.float32), sample_rate
            out.append(audio_to_logmel(wave, sr, self.audio_spec, train=False))  # [M, F]
        return torch.stack(out)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        self._need("text")
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings")
        return self.tokenizer(list(texts))  # [B, L]

    # ---------------------------------------------------------------------------------- embed

    @torch.no_grad()
    def embed(self, modality: str, inputs: Tensor) -> Tensor:
        """Preprocessed inputs of one modality -> normalised embeddings ``[B, E]``, in batches."""
        self._need(modality)
        parts = []
        for start in range(0, inputs.shape[0], self.batch_size):
            x = inputs[start : start + self.batch_size].to(self.device)
            parts.append(self.model.embed(modality, x).float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, self.cfg.model.embed_dim)

    def embed_images(self, items: Any) -> Tensor:
        return self.embed("image", self.preprocess_images(items))

    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        return self.embed("text", self.tokenize(texts))

    def embed_audio(self, items: Any, sample_rate: int | None = None) -> Tensor:
        return self.embed("audio", self.preprocess_audio(items, sample_rate))


def load(path: PathLike, *, device: torch.device | str = "cpu", batch_size: int = 64) -> Embedder:
    """A run directory, a DeepSpeed checkpoint of any ZeRO stage, or an ``mmssl export`` folder."""
    return Embedder(load_checkpoint(path), device=device, batch_size=batch_size)
