"""The built-in demo data set "spoken digits": tiny images, captions and speech, made offline in seconds.

Images are scikit-learn's 1797 handwritten 8x8 digits, rendered as 32x32 grayscale PNGs. Each image gets
`captions_per_image` captions from different templates ("a handwritten seven", "the number 7", ...),
and each caption is spoken by espeak-ng with a random voice, speed and pitch. One sample = one
(image, caption, speech) triple, so the three modalities are aligned through the digit.

Layout written under out_dir:
    train/shard-000000.tar ... + sizes.json     test/ (same)     classes.json     DONE.json (the marker)
"""

import concurrent.futures
import io
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_pipelines.shards import SIZES_FILE, write_shards

CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Voices shipped with espeak-ng's own data (no mbrola); "+fN"/"+mN" pick a voice variant.
DEFAULT_VOICES = ("en-us", "en", "en-gb-scotland", "en-029", "en-gb-x-rp", "en+f3", "en+m3", "en-us+f2")
TEMPLATES = (
    "a handwritten {word}",
    "the number {num}",
    "a photo of the digit {word}",
    "the digit {num}, written by hand",
    "an image of {a_word}",
    "{word}",
    "a small picture of the number {word}",
    "digit {num}",
    "a blurry {word} drawn by hand",
    "this is {a_word}",
    "a pixelated {num}",
    "the handwritten number {word}",
)
SPEED_RANGE = (130, 190)  # words per minute, inclusive
PITCH_RANGE = (30, 70)  # espeak's 0-99 scale, inclusive
IMAGE_SIZE = 32
MARKER = "DONE.json"
_FORMAT_VERSION = 1  # bump when the output changes for the same parameters


def caption_for(label: int, template: str) -> str:
    word = CLASSES[label]
    article = "an" if word[0] in "aeiou" else "a"
    return template.format(word=word, num=label, a_word=f"{article} {word}")


def render_digit(pixels: np.ndarray) -> bytes:
    """8x8 array with levels 0..16 -> 32x32 grayscale PNG bytes (white digit on black)."""
    gray = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # [8, 8]
    image = Image.fromarray(gray, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def speak(text: str, voice: str, speed: int, pitch: int, wav_path: Path) -> bytes:
    """espeak-ng's WAV (22050 Hz mono 16-bit) for `text`."""
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav_path), text]
    done = subprocess.run(cmd, capture_output=True, text=True)
    # espeak-ng exits 0 for some unusable voices (e.g. a missing mbrola voice) but writes no audio.
    if done.returncode != 0 or not wav_path.is_file() or wav_path.stat().st_size <= 44:
        reason = (done.stderr or done.stdout).strip().replace("\n", " ") or "no audio written"
        raise RuntimeError(f"espeak-ng failed for voice {voice!r} on {text!r}: {reason}")
    return wav_path.read_bytes()


def _listed(option: str) -> set[str]:
    """Language codes, voice files and their base names listed by `espeak-ng --voices[=...]`, lower case."""
    listing = subprocess.run(["espeak-ng", option], capture_output=True, text=True, check=True).stdout
    names = set()
    for line in listing.splitlines()[1:]:
        columns = line.split()  # Pty, Language, Age/Gender, VoiceName, File, Other languages
        if len(columns) >= 5:
            names |= {columns[1].lower(), columns[4].lower(), columns[4].rsplit("/", 1)[-1].lower()}
    return names


def check_voices(voices: tuple[str, ...]) -> None:
    """Raise naming the first voice espeak-ng does not list ("lang" or "lang+variant").

    Needed because espeak-ng falls back silently: "no-such-voice" speaks Norwegian ("no") and
    "en+nosuch" drops the unknown variant, both with exit status 0.
    """
    languages, variants = _listed("--voices"), _listed("--voices=variant")
    for voice in voices:
        base, _, variant = voice.lower().partition("+")
        if base not in languages or (variant and variant not in variants):
            raise ValueError(
                f"unknown espeak-ng voice {voice!r}: see `espeak-ng --voices=en` and `espeak-ng --voices=variant`"
            )


def _plan(
    labels: np.ndarray, *, test_fraction: float, seed: int, captions_per_image: int, voices: tuple[str, ...]
) -> dict[str, list[dict[str, Any]]]:
    """All random choices, made up front in one seeded order: split, templates, voices, speeds, pitches."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    n_test = int(round(n * test_fraction))
    if not 0 < n_test < n:
        raise ValueError(f"test_fraction={test_fraction} of {n} images leaves an empty train or test split")
    test_images = set(rng.permutation(n)[:n_test].tolist())
    plan: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for index, label in enumerate(labels.tolist()):
        split = "test" if index in test_images else "train"
        for j, t in enumerate(rng.choice(len(TEMPLATES), size=captions_per_image, replace=False).tolist()):
            plan[split].append(
                {
                    "key": f"{split}_{index:06d}_{j}",
                    "image_index": index,
                    "label": label,
                    "caption": caption_for(label, TEMPLATES[t]),
                    "voice": voices[int(rng.integers(len(voices)))],
                    "speed": int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1)),
                    "pitch": int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
                }
            )
    # Write in a shuffled order: the captions of one image never sit side by side in a shard, so
    # a small shuffle buffer does not put the same image twice in a contrastive batch.
    for split in plan:
        plan[split] = [plan[split][i] for i in rng.permutation(len(plan[split])).tolist()]
    return plan


def _render_speech(
    plan: dict[str, list[dict[str, Any]]], voices: tuple[str, ...], progress: bool
) -> dict[tuple[str, str, int, int], bytes]:
    """(caption, voice, speed, pitch) -> WAV bytes, each distinct render done once, 2 at a time."""
    jobs = sorted(
        {(s["caption"], s["voice"], s["speed"], s["pitch"]) for rows in plan.values() for s in rows}
    )
    with tempfile.TemporaryDirectory(prefix="spoken_digits_") as tmp:
        for i, voice in enumerate(voices):  # fail fast, naming the voice, before rendering thousands
            speak("zero", voice, 160, 50, Path(tmp) / f"check_{i}.wav")
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            renders = pool.map(lambda ij: speak(*ij[1], Path(tmp) / f"{ij[0]}.wav"), enumerate(jobs))
            wavs = list(tqdm(renders, total=len(jobs), desc="speaking captions", disable=not progress))
    return dict(zip(jobs, wavs, strict=True))


def _clear_split(directory: Path) -> None:
    """Remove a previous build's files (only the ones this builder writes)."""
    for path in [*directory.glob("shard-*.tar"), directory / SIZES_FILE]:
        path.unlink(missing_ok=True)


def _finished(out: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a complete earlier build with the same parameters, else None."""
    try:
        done = json.loads((out / MARKER).read_text())
        if done["params"] != params:
            return None
        splits = done["summary"]["splits"]
        complete = all((out / split / name).is_file() for split in splits for name in splits[split]["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no marker, or one this version does not understand: build again
    return done["summary"] if complete else None


def _digits(limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digit images ``[N, 8, 8]`` (levels 0..16) and labels ``[N]``, the first ``limit``."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images, labels = digits.images, digits.target
    if limit is not None:
        if limit < 2:
            raise ValueError(f"limit must be at least 2 images (one per split), got {limit}")
        images, labels = images[:limit], labels[:limit]
    return images, labels


def _write_split(
    directory: Path,
    split: str,
    rows: list[dict[str, Any]],
    pngs: list[bytes],
    wavs: dict[tuple[str, str, int, int], bytes],
    samples_per_shard: int,
    progress: bool,
) -> dict[str, Any]:
    """Write one split's planned samples as shards; returns its counts, shard pattern and shards."""
    samples = (
        {
            "__key__": s["key"],
            "png": pngs[s["image_index"]],
            "txt": s["caption"],
            "wav": wavs[(s["caption"], s["voice"], s["speed"], s["pitch"])],
            "json": {
                "label": s["label"],
                "split": split,
                "caption": s["caption"],
                "voice": s["voice"],
                "speed": s["speed"],
                "pitch": s["pitch"],
                "image_index": s["image_index"],
            },
        }
        for s in tqdm(rows, desc=f"writing {split}", disable=not progress)
    )
    written = write_shards(samples, directory, max_count=samples_per_shard)
    return {
        "samples": written["total"],
        "images": len({s["image_index"] for s in rows}),
        "pattern": written["pattern"],
        "shards": written["shards"],
    }


def build_spoken_digits(
    out_dir: str | Path,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    samples_per_shard: int = 500,
    captions_per_image: int = 2,
    voices: tuple[str, ...] = DEFAULT_VOICES,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the demo shards under out_dir (skipped when a build with the same parameters is there).

    `limit` uses only the first `limit` digit images (for quick tests). Returns a summary: per split the
    sample and image counts, the shard pattern and per-shard counts; the class names; seconds taken.
    """
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_image must be in [1, {len(TEMPLATES)}], got {captions_per_image}")
    if not voices:
        raise ValueError("voices must name at least one espeak-ng voice")
    out = Path(out_dir)
    params = {
        "format_version": _FORMAT_VERSION,
        "test_fraction": test_fraction,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "captions_per_image": captions_per_image,
        "voices": list(voices),
        "limit": limit,
    }
    previous = _finished(out, params)
    if previous is not None:
        return {**previous, "skipped": True}
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(
            "espeak-ng is not installed: run `sudo apt-get install espeak-ng` (Debian/Ubuntu) and try again"
        )
    check_voices(tuple(voices))

    start = time.perf_counter()
    images, labels = _digits(limit)
    plan = _plan(
        labels, test_fraction=test_fraction, seed=seed, captions_per_image=captions_per_image, voices=voices
    )

    marker = out / MARKER
    marker.unlink(missing_ok=True)
    wavs = _render_speech(plan, voices, progress)
    pngs = [render_digit(pixels) for pixels in images]
    splits = {}
    for split, rows in plan.items():
        _clear_split(out / split)
        splits[split] = _write_split(out / split, split, rows, pngs, wavs, samples_per_shard, progress)
    (out / "classes.json").write_text(json.dumps(list(CLASSES)) + "\n")
    summary = {
        "out_dir": str(out),
        "splits": splits,
        "classes": list(CLASSES),
        "speech_renders": len(wavs),
        "seconds": round(time.perf_counter() - start, 2),
    }
    marker.write_text(json.dumps({"params": params, "summary": summary}, indent=1) + "\n")
    return {**summary, "skipped": False}
