"""Shards -> decoded samples -> batches with presence masks, for image/text/audio pretraining.

This package never imports mmssl: mmssl hands it specs (ImageSpec, AudioSpec) and a tokenizer.
"""

from data_pipelines.bad_data import BAD_KINDS, KEPT_KINDS, BadDataError, BadDataTally, BadSample
from data_pipelines.collate import MODALITIES, collate, trim_padding
from data_pipelines.config import SourceConfig, StreamConfig
from data_pipelines.decode import check_layout, decode_sample, read_label, templates
from data_pipelines.demo import build_spoken_digits
from data_pipelines.layouts import PRESETS, Layout, parse_layout, resolve_layout
from data_pipelines.manifest import write_from_manifest
from data_pipelines.position import combine_states
from data_pipelines.reports import format_verify_report, format_write_summary
from data_pipelines.shards import count_samples, iter_samples, write_shards
from data_pipelines.specs import AudioAugment, AudioSpec, ImageAugment, ImageSpec
from data_pipelines.stream import StreamLoader, build_loader
from data_pipelines.synthetic import clap_samples, img2dataset_samples, synthetic_samples
from data_pipelines.tario import ShardError, expand_shards, scan_shard
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
from data_pipelines.verify import label_census, verify_exit_code, verify_shards

__all__ = [
    "BAD_KINDS",
    "KEPT_KINDS",
    "MODALITIES",
    "PRESETS",
    "AudioAugment",
    "AudioSpec",
    "BadDataError",
    "BadDataTally",
    "BadSample",
    "ImageAugment",
    "ImageSpec",
    "Layout",
    "ShardError",
    "SourceConfig",
    "StreamConfig",
    "StreamLoader",
    "Tokenizer",
    "audio_to_logmel",
    "build_loader",
    "build_spoken_digits",
    "check_layout",
    "clap_samples",
    "collate",
    "trim_padding",
    "combine_states",
    "count_samples",
    "crop_or_pad",
    "decode_audio",
    "decode_image",
    "decode_sample",
    "decode_text",
    "expand_shards",
    "format_verify_report",
    "format_write_summary",
    "img2dataset_samples",
    "iter_samples",
    "label_census",
    "parse_layout",
    "read_label",
    "resample",
    "resolve_layout",
    "scan_shard",
    "synthetic_samples",
    "templates",
    "tokenize",
    "verify_exit_code",
    "verify_shards",
    "write_from_manifest",
    "write_shards",
]
