"""Shards -> decoded samples -> batches with presence masks, for image/text/audio pretraining.

This package never imports mmssl: mmssl hands it specs (ImageSpec, AudioSpec) and a tokenizer.
"""

from data_pipelines.collate import MODALITIES, collate
from data_pipelines.demo import build_spoken_digits
from data_pipelines.shards import count_samples, iter_samples, write_shards
from data_pipelines.specs import AudioSpec, ImageSpec
from data_pipelines.stream import StreamConfig, build_loader, decode_sample, expand_shards
from data_pipelines.synthetic import synthetic_samples
from data_pipelines.transforms import (
    Tokenizer,
    audio_to_logmel,
    crop_or_pad,
    decode_audio,
    decode_image,
    decode_text,
    resample,
    tokenize,
)

__all__ = [
    "MODALITIES",
    "AudioSpec",
    "ImageSpec",
    "StreamConfig",
    "Tokenizer",
    "audio_to_logmel",
    "build_loader",
    "build_spoken_digits",
    "collate",
    "count_samples",
    "crop_or_pad",
    "decode_audio",
    "decode_image",
    "decode_sample",
    "decode_text",
    "expand_shards",
    "iter_samples",
    "resample",
    "synthetic_samples",
    "tokenize",
    "write_shards",
]
