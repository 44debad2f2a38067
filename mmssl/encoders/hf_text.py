"""Text tower from a local Hugging Face encoder (the ``towers`` extra): BERT, RoBERTa and their kin.

``model.text.hf_path`` names a model directory (``config.json``, the tokenizer's files, weights).
Nothing is downloaded (``local_files_only``). When the architecture has a masked-LM model in
transformers (``AutoModelForMaskedLM``), that model is loaded and its encoder (``base_model``) becomes
the trunk; its masked-LM head is kept aside for masked language modelling
(:meth:`HFTextTower.masked_lm_head`), so MLM trains the model's own head. Otherwise ``AutoModel`` is
the trunk and the tower refuses MLM. A directory without weights builds the architecture at random
(as does a model built on the meta device, where nothing is read).

Padding keys are masked (the tokenizer's pad id); the first position stays visible, so an absent
caption (a row of zeros from the loader) gives no NaN. Pooling (``pooler``): the first token's
features (``cls``: BERT's [CLS], RoBERTa's <s>) or the mean over the unmasked tokens (``mean``); then
mmssl's projection ``text_projection`` into the shared embedding.

Axis legend: B batch, L tokens, D hidden size, E shared embedding, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mmssl.config import TextTowerConfig
from mmssl.encoders.text import Vocabulary
from mmssl.optional import quiet_transformers, require
from mmssl.tokenizer import load_hf_tokenizer

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def has_weights(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def check_hf_dir(path: str, setting: str = "model.text.hf_path") -> None:
    """One ValueError naming ``setting`` when ``path`` is no local Hugging Face model directory."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{setting}={path}: no such directory (a local Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{setting}={path}: not a Hugging Face model directory (no config.json)")


def load_trunk(cfg: TextTowerConfig) -> tuple[nn.Module, nn.Module | None]:
    """(the encoder, its masked-LM head or None) from ``cfg.hf_path``."""
    transformers = require("transformers", "model.text.kind=hf")
    check_hf_dir(cfg.hf_path)
    with quiet_transformers(transformers):
        config = transformers.AutoConfig.from_pretrained(cfg.hf_path, local_files_only=True)
        masked_lm = type(config) in transformers.AutoModelForMaskedLM._model_mapping
        auto = transformers.AutoModelForMaskedLM if masked_lm else transformers.AutoModel
        if has_weights(cfg.hf_path) and torch.get_default_device().type != "meta":
            model = auto.from_pretrained(cfg.hf_path, local_files_only=True)
        else:
            model = auto.from_config(config)
    if not masked_lm:
        return model, None
    heads = [m for name, m in model.named_children() if name != model.base_model_prefix]
    # one head module (BERT's cls, RoBERTa's lm_head); a head spread over several modules is not used
    return model.base_model, heads[0] if len(heads) == 1 else None


class HFTextTower(nn.Module):
    """A Hugging Face encoder with mmssl's pooling and projection; keyed ``encoder.*`` and
    ``text_projection`` in the state dict."""

    kind = "hf"

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.encoder, head = load_trunk(cfg)
        self._head = [head]  # in a list: not a submodule of the tower (the MLM objective takes it)
        config = self.encoder.config
        self.width = config.hidden_size
        self.context_length = cfg.context_length
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and cfg.context_length > limit:
            raise ValueError(
                f"model.text.context_length={cfg.context_length} exceeds the {limit} positions of {cfg.hf_path}"
            )
        if cfg.grad_checkpointing:
            if hasattr(self.encoder, "activation_checkpointing_enable"):  # transformers >= 5
                self.encoder.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        tokenizer = load_hf_tokenizer(cfg.hf_path)
        self.vocab = Vocabulary(
            pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            special=tuple(tokenizer.all_special_ids),
            mask=tokenizer.mask_token_id,
            random_ids=(0, min(len(tokenizer), config.vocab_size)),
        )
        self.text_projection = nn.Parameter(self.width**-0.5 * torch.randn(self.width, embed_dim))

    def _attention_mask(self, text: Tensor) -> Tensor:
        """``[B, L]`` 1 for tokens, 0 for padding; position 0 always 1 (see the module docstring)."""
        mask = text != self.vocab.pad
        mask[:, 0] = True
        return mask.long()

    def forward_features(self, text: Tensor) -> Tensor:
        """Token ids ``[B, L]`` (``L`` <= context_length) -> the encoder's last hidden states ``[B, L, D]``."""
        return self.encoder(input_ids=text, attention_mask=self._attention_mask(text)).last_hidden_state

    def pool(self, features: Tensor, text: Tensor) -> Tensor:
        """``[B, L, D] -> [B, D]``: the first token, or the mean over unmasked tokens."""
        if self.cfg.pooler == "cls":
            return features[:, 0]
        mask = self._attention_mask(text).to(features.dtype)[..., None]  # [B, L, 1]
        return (features * mask).sum(dim=1) / mask.sum(dim=1)

    def forward_head(self, features: Tensor, text: Tensor) -> Tensor:
        return self.pool(features, text) @ self.text_projection  # [B, E]

    def forward(self, text: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(text), text)

    def masked_lm_head(self, *, tie: bool | None = None) -> nn.Module:
        """The model's own masked-LM head, ``[..., D] -> [..., V]``, with the weights it was loaded with:
        tied to the word embeddings or not as the model was built (``tie_word_embeddings`` in its
        config.json), which this tower keeps. ``tie`` (``objectives.masked_text.tie_head``), when given,
        must say the same."""
        head = self._head[0]
        if head is None or self.vocab.mask is None:
            what = "masked-LM head" if head is None else "[MASK] token"
            raise ValueError(
                f"objectives.masked_text: model.text.hf_path={self.cfg.hf_path} has no {what} mmssl can "
                "use: set objectives.masked_text.enabled=false"
            )
        tied = any(p is self.encoder.get_input_embeddings().weight for p in head.parameters())
        if tie is not None and tie != tied:
            raise ValueError(
                f"objectives.masked_text.tie_head={str(tie).lower()}: the masked-LM head of model.text.hf_path="
                f"{self.cfg.hf_path} is {'' if tied else 'not '}tied to its word embeddings "
                f"(tie_word_embeddings in its config.json): set tie_head={str(tied).lower()}"
            )
        return head
