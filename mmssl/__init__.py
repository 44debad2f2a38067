"""mmssl: multimodal self-supervised pretraining of image, text and audio towers under DeepSpeed ZeRO."""

__version__ = "0.1.0"
