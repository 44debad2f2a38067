"""Per-modality transforms and collate: exact shapes, resampling, crops, presence masks."""

import io
import math

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import data_pipelines.transforms as T
from data_pipelines import (
    AudioSpec,
    ImageAugment,
    ImageSpec,
    audio_to_logmel,
    collate,
    decode_audio,
    decode_image,
)

SPEC = AudioSpec(sample_rate=16000, clip_samples=8000, n_fft=400, hop_length=160, n_mels=32)


def tone(sr: int, seconds: float, hz: float = 1000.0) -> torch.Tensor:
    t = torch.arange(int(sr * seconds), dtype=torch.float32) / sr
    return 0.5 * torch.sin(2 * torch.pi * hz * t)  # [T]


@pytest.mark.parametrize("sr", [22050, 16000])
@pytest.mark.parametrize(
    "seconds", [0.1, 0.5, 2.0]
)  # shorter than, equal to (at 16 kHz), longer than the clip
@pytest.mark.parametrize("train", [True, False])
def test_logmel_shape_is_exact(sr, seconds, train):
    out = audio_to_logmel(tone(sr, seconds), sr, SPEC, train, torch.Generator().manual_seed(0))
    assert out.shape == (SPEC.n_mels, SPEC.n_frames) == (32, 51)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_resampling_path_used_only_when_rates_differ(monkeypatch):
    calls = []
    original = T.resample
    monkeypatch.setattr(T, "resample", lambda w, a, b: calls.append((a, b)) or original(w, a, b))
    a = audio_to_logmel(tone(22050, 1.0), 22050, SPEC, False)
    assert calls == [(22050, 16000)]
    b = audio_to_logmel(tone(16000, 1.0), 16000, SPEC, False)
    assert calls == [(22050, 16000)]
    # The same 1 kHz tone at either rate lands in the same mel bin with nearly the same spectrum.
    spectrum_a, spectrum_b = a.mean(dim=1), b.mean(dim=1)  # [n_mels]
    assert spectrum_a.argmax() == spectrum_b.argmax()
    assert torch.corrcoef(torch.stack([spectrum_a, spectrum_b]))[0, 1] > 0.99


def test_eval_centre_crop_is_deterministic_and_centred():
    wave = torch.randn(20000)
    first = audio_to_logmel(wave, 16000, SPEC, False)
    assert torch.equal(first, audio_to_logmel(wave, 16000, SPEC, False))
    start = (20000 - SPEC.clip_samples) // 2
    assert torch.allclose(first, audio_to_logmel(wave[start : start + SPEC.clip_samples], 16000, SPEC, False))


def test_train_crop_follows_the_generator():
    wave = torch.randn(40000)
    run = [audio_to_logmel(wave, 16000, SPEC, True, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(run[0], run[1])
    assert not torch.equal(run[0], run[2])


def test_short_clip_is_zero_padded_on_the_right():
    out = audio_to_logmel(tone(16000, 0.2), 16000, SPEC, False)  # 3200 of 8000 samples
    silence = (np.log(1e-6) - SPEC.mean) / (2 * SPEC.std)
    assert torch.allclose(out[:, -10:], torch.full_like(out[:, -10:], silence))
    assert out[:, :10].max() > silence + 1


def test_decode_audio_mixes_channels_to_mono():
    left = 0.5 * np.sin(np.linspace(0, 100, 4000, dtype=np.float32))
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([left, 0.5 * left], axis=1), 22050, format="WAV", subtype="FLOAT")
    wave, sr = decode_audio(buffer.getvalue())
    assert sr == 22050 and wave.shape == (4000,) and wave.dtype == torch.float32
    assert torch.allclose(wave, torch.from_numpy(0.75 * left), atol=1e-6)


def test_decode_image_resizes_and_normalises():
    buffer = io.BytesIO()
    Image.new("L", (8, 8), color=255).save(buffer, format="PNG")
    out = decode_image(
        buffer.getvalue(), ImageSpec(size=12, mean=(0.5, 0.0, 0.5), std=(0.5, 1.0, 0.25)), False
    )
    assert out.shape == (3, 12, 12) and out.dtype == torch.float32
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor([1.0, 1.0, 2.0]))


def test_collate_fills_missing_rows_with_zeros():
    samples = [
        {"__key__": "a", "label": 3, "image": torch.ones(3, 4, 4), "text": torch.arange(5)},
        {"__key__": "b", "label": -1, "image": None, "text": torch.arange(5) + 1},
    ]
    batch = collate(samples)
    assert batch["__key__"] == ["a", "b"] and batch["label"].tolist() == [3, -1]
    assert batch["image"].shape == (2, 3, 4, 4) and batch["image"][1].abs().sum() == 0
    assert batch["present"]["image"].tolist() == [True, False]
    assert batch["present"]["text"].tolist() == [True, True] and batch["text"].dtype == torch.long
    assert "audio" not in batch and "audio" not in batch["present"]


def test_collate_uses_templates_when_a_whole_batch_lacks_a_modality():
    samples = [{"__key__": "a", "label": 0, "audio": None}]
    with pytest.raises(ValueError, match="audio"):
        collate(samples)
    batch = collate(samples, templates={"audio": torch.zeros(4, 7)})
    assert batch["audio"].shape == (1, 4, 7) and batch["present"]["audio"].tolist() == [False]


def test_collate_names_the_sample_with_a_wrong_shape():
    samples = [
        {"__key__": "a", "image": torch.zeros(3, 4, 4)},
        {"__key__": "odd", "image": torch.zeros(3, 5, 5)},
    ]
    with pytest.raises(ValueError, match="'odd'"):
        collate(samples)


def test_specs_reject_bad_values():
    with pytest.raises(ValueError, match="hop_length"):
        AudioSpec(sample_rate=16000, clip_samples=100, n_fft=64, hop_length=0, n_mels=8)
    with pytest.raises(ValueError, match="size"):
        ImageSpec(size=0)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
@pytest.mark.parametrize("rate, channels", [(8000, 1), (22050, 2), (48000, 2)])
def test_every_audio_format_decodes_to_the_configured_shape(fmt, rate, channels):
    from data_pipelines.synthetic import audio_bytes

    data = audio_bytes(3, rate, 0.3, channels, fmt)
    assert fmt.upper() in soundfile.available_formats()
    wave, sr = decode_audio(data)
    assert sr == rate and wave.dim() == 1 and wave.dtype == torch.float32
    assert abs(wave.shape[0] - 0.3 * rate) < 0.02 * rate  # mp3/ogg codecs may add a few ms of padding
    for train in (True, False):  # 0.3 s is shorter than the 0.5 s clip: right-padded
        out = audio_to_logmel(wave, sr, SPEC, train, torch.Generator().manual_seed(0))
        assert out.shape == (SPEC.n_mels, SPEC.n_frames) and torch.isfinite(out).all()
    long = audio_to_logmel(torch.cat([wave] * 3), sr, SPEC, False)  # 0.9 s: centre-cropped to 0.5 s
    assert long.shape == (SPEC.n_mels, SPEC.n_frames)


def test_stereo_channels_are_mixed_for_every_format():
    t = np.arange(8000, dtype=np.float32) / 16000
    left = 0.4 * np.sin(2 * np.pi * 500 * t)
    for fmt, subtype in (("WAV", "FLOAT"), ("FLAC", "PCM_24")):
        buffer = io.BytesIO()
        soundfile.write(buffer, np.stack([left, -left], axis=1), 16000, format=fmt, subtype=subtype)
        wave, _ = decode_audio(buffer.getvalue())
        assert wave.abs().max() < 1e-4  # opposite channels cancel in the mono mix


@pytest.mark.parametrize("orig, new", [(22050, 16000), (44100, 16000), (8000, 16000), (48000, 32000)])
@pytest.mark.parametrize("length", [1, 999, 44100])
def test_fast_resample_matches_torchaudio(orig, new, length):
    import torchaudio

    wave = torch.randn(length, generator=torch.Generator().manual_seed(length))
    ours = T.resample(wave, orig, new)
    reference = torchaudio.transforms.Resample(orig, new)(wave)  # what this code used before
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("n_fft, hop, n_mels, rate", [(400, 160, 64, 16000), (256, 64, 16, 8000)])
def test_fast_mel_spectrogram_matches_torchaudio(n_fft, hop, n_mels, rate):
    import torchaudio

    wave = torch.randn(rate // 3, generator=torch.Generator().manual_seed(0))
    reference = torchaudio.transforms.MelSpectrogram(
        sample_rate=rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, center=True, power=2.0
    )(wave)
    ours = T.mel_spectrogram(wave, rate, n_fft, hop, n_mels)
    assert ours.shape == reference.shape == (n_mels, wave.shape[0] // hop + 1)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
@pytest.mark.parametrize("train", [True, False])
def test_reading_only_the_clip_equals_decoding_everything_and_cropping(fmt, train):
    from data_pipelines.synthetic import audio_bytes
    from data_pipelines.transforms import decode_audio_clip

    data = audio_bytes(4, 44100, 1.5, 2, fmt)  # 1.5 s: three times the 0.5 s clip

    def logmel(wave_and_rate: tuple[torch.Tensor, int]) -> torch.Tensor:
        return audio_to_logmel(*wave_and_rate, SPEC, train, torch.Generator().manual_seed(7))

    whole = logmel(decode_audio(data))
    clip = decode_audio_clip(data, SPEC, train, torch.Generator().manual_seed(7))
    assert clip[0].shape[0] == math.ceil(SPEC.clip_samples * 44100 / SPEC.sample_rate)
    assert torch.allclose(logmel(clip), whole, atol=1e-3 if fmt == "mp3" else 1e-6)


def _wav_bytes(wave: torch.Tensor, sr: int) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave.numpy(), sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def _loud_frames(logmel: torch.Tensor) -> torch.Tensor:
    """Indices of frames with speech-level energy (well above the zero padding's floor)."""
    return torch.nonzero(logmel.amax(dim=0) > logmel.min() + 1.0)[:, 0]


def test_audio_augment_is_seeded_training_only_and_each_part_acts():
    import dataclasses

    from data_pipelines import AudioAugment
    from data_pipelines.transforms import decode_audio_clip

    data = _wav_bytes(tone(16000, 0.2, hz=800.0), 16000)  # a short burst in a 0.5 s window

    def logmel(augment, seed, train=True):
        spec = dataclasses.replace(SPEC, augment=augment)
        g = torch.Generator().manual_seed(seed)
        wave, sr = decode_audio_clip(data, spec, train, g)
        return audio_to_logmel(wave, sr, spec, train, g)

    plain = logmel(None, 0)
    everything = AudioAugment(speed=(0.8, 1.25), shift=True, gain_db=6.0, freq_masks=2, freq_mask_width=8,
                              time_masks=2, time_mask_width=10)  # fmt: skip
    assert torch.equal(logmel(everything, 0, train=False), logmel(None, 0, train=False))  # eval: untouched
    assert torch.equal(logmel(everything, 3), logmel(everything, 3))  # reproducible from the seed
    assert not torch.equal(logmel(everything, 3), logmel(everything, 4))
    # shift: the burst starts at different frames, and is never cut
    starts = {int(_loud_frames(logmel(AudioAugment(shift=True), s))[0]) for s in range(8)}
    shifted = len(_loud_frames(logmel(AudioAugment(shift=True), 5)))
    assert len(starts) > 3 and abs(shifted - len(_loud_frames(plain))) <= 1  # (frame alignment)
    # speed: faster clips are shorter, slower ones longer
    lengths = [len(_loud_frames(logmel(AudioAugment(speed=(v, v)), 0))) for v in (0.8, 1.0, 1.25)]
    assert lengths[0] > lengths[1] > lengths[2]
    # gain: a constant shift of the log-mel where the signal is
    up = logmel(AudioAugment(gain_db=6.0), 1) - plain
    strong = plain > plain.max() - 0.5  # the tone itself, far above the log floor
    assert up[strong].std() < 1e-3 and abs(float(up[strong].mean())) > 1e-3
    # SpecAugment: masked bands are exactly the normalised mean, 0
    masked = logmel(AudioAugment(freq_masks=1, freq_mask_width=8, time_masks=1, time_mask_width=10), 2)
    assert (masked == 0).any() and torch.equal(masked[masked != 0], plain[masked != 0])
    with pytest.raises(ValueError, match="speed"):
        AudioAugment(speed=(1.2, 1.0))


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _torchvision_pipeline(*augment):
    from torchvision import transforms as tv

    normalise = [tv.ToTensor(), tv.Normalize([0.5] * 3, [0.5] * 3)]
    return tv.Compose([*augment, *normalise])


IMAGE = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)  # [H, W, C], not square


def test_image_eval_is_open_clips_resize_and_centre_crop_and_training_without_augment_is_eval():
    from torchvision import transforms as tv

    # 40x24 -> 12: the shorter side's resize (to 20x12) and the crop offset (4) are whole pixels, where
    # torchvision's rounding and our exact centred square agree
    spec = ImageSpec(size=12)
    bicubic = tv.InterpolationMode.BICUBIC
    reference = _torchvision_pipeline(tv.Resize(12, interpolation=bicubic), tv.CenterCrop(12))
    out = decode_image(_png(IMAGE), spec, False)
    torch.testing.assert_close(out, reference(Image.fromarray(IMAGE)), atol=1e-6, rtol=0)
    assert torch.equal(out, decode_image(_png(IMAGE), spec, False))  # deterministic
    assert torch.equal(out, decode_image(_png(IMAGE), spec, True, torch.Generator().manual_seed(0)))
    augmented = ImageSpec(size=12, augment=ImageAugment(flip=1.0, color_jitter=(0.5, 0.5, 0.5, 0.2)))
    assert torch.equal(out, decode_image(_png(IMAGE), augmented, False))  # evaluation never augments


@pytest.mark.parametrize("width, height", [(32, 32), (40, 24), (13, 50)])
def test_random_resized_crop_draws_torchvisions_boxes_from_the_generator(width, height):
    from torchvision import transforms as tv

    for seed in range(40):
        torch.manual_seed(seed)  # torchvision draws from the global generator
        top, left, h, w = tv.RandomResizedCrop.get_params(
            Image.new("RGB", (width, height)), [0.3, 1.0], [0.75, 4 / 3]
        )
        box = T.random_resized_box(
            width, height, (0.3, 1.0), (0.75, 4 / 3), torch.Generator().manual_seed(seed)
        )
        assert box == (left, top, left + w, top + h)


def test_image_augment_matches_torchvision_and_is_seeded():
    from torchvision import transforms as tv

    augment = ImageAugment(scale=(0.5, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1))
    spec = ImageSpec(size=16, augment=augment)
    reference = _torchvision_pipeline(
        tv.RandomResizedCrop(16, scale=(0.5, 1.0), interpolation=tv.InterpolationMode.BICUBIC),
        tv.ColorJitter(0.4, 0.4, 0.4, 0.1),
    )
    smooth = np.linspace(0, 255, 40, dtype=np.float32)[None, :, None] * np.ones((24, 1, 3)) * [1.0, 0.6, 0.3]
    smooth = smooth.astype(np.uint8)  # a colour ramp: crop offsets show, and edge handling barely matters
    outs = []
    for seed in range(4):
        torch.manual_seed(seed)
        expected = reference(Image.fromarray(smooth))
        ours = decode_image(_png(smooth), spec, True, torch.Generator().manual_seed(seed))
        # the same draws; one resample of the box instead of crop-then-resize differs by a level at the
        # box's edge at most, which the jitter's contrast and saturation gains can triple
        level = 2 / 255
        assert (ours - expected).abs().max() <= 4 * level and (ours - expected).abs().mean() < level / 4, seed
        outs.append(ours)
    assert all(not torch.equal(outs[0], o) for o in outs[1:])  # different seeds, different views
    again = decode_image(_png(smooth), spec, True, torch.Generator().manual_seed(2))
    assert torch.equal(again, outs[2])  # the same seed, the same tensor
    jitter = (0.4, 0.4, 0.4, 0.1)
    for seed in range(10):  # colour jitter alone is bit-exact (the same PIL operations)
        torch.manual_seed(seed)
        expected = tv.ColorJitter(*jitter)(Image.fromarray(IMAGE))
        ours = T.color_jitter(Image.fromarray(IMAGE), jitter, torch.Generator().manual_seed(seed))
        assert np.array_equal(np.asarray(ours), np.asarray(expected))


def test_image_flip_and_the_default_crop_keep_a_digit():
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[8:24, 4:12] = 255  # a bar on the left
    flipped = decode_image(_png(pixels), ImageSpec(size=32, augment=ImageAugment(crop=False, flip=1.0)), True)
    assert torch.equal(flipped, decode_image(_png(pixels[:, ::-1].copy()), ImageSpec(size=32), False))
    crops = [
        decode_image(
            _png(pixels), ImageSpec(size=32, augment=ImageAugment()), True, torch.Generator().manual_seed(s)
        )
        for s in range(20)
    ]
    assert len({c.sum().item() for c in crops}) >= 5  # the default crop moves and scales ...
    lit = [(c[0] > 0).sum().item() / (c[0] > 0).numel() for c in crops]  # ... but keeps the bar whole
    assert min(lit) > 0.8 * (16 * 8) / 1024


def test_jpeg_draft_decodes_a_crop_at_enough_resolution():
    ramp = np.linspace(0, 255, 256, dtype=np.float32)
    pixels = np.stack(
        [np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2, np.full((256, 256), 128)], -1
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    spec = ImageSpec(size=32, augment=ImageAugment(scale=(0.3, 0.3), ratio=(1.0, 1.0)))
    ours = decode_image(buffer.getvalue(), spec, True, torch.Generator().manual_seed(0))
    box = T.random_resized_box(256, 256, (0.3, 0.3), (1.0, 1.0), torch.Generator().manual_seed(0))
    with Image.open(io.BytesIO(buffer.getvalue())) as img:  # no draft: every pixel decoded
        full = img.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC, box=box)
    expected = torch.from_numpy(np.asarray(full, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert (ours - expected).abs().mean() < 0.02


def test_image_augment_rejects_bad_values():
    for bad, field in (({"scale": (0.0, 1.0)}, "scale"), ({"ratio": (2.0, 1.0)}, "ratio"),
                       ({"flip": 1.5}, "flip"), ({"color_jitter": (0, 0, 0, 0.7)}, "color_jitter")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            ImageAugment(**bad)
