"""What a timm or Hugging Face tower costs per step against mmssl's native tower of the same size.

For each modality, forward + backward of the tower alone (embedding, normalised, summed) on a random
batch already in memory: the native tower of ``--preset`` against ``--preset``_timm (timm ViTs of the
same width, depth, heads and patches for image and audio) and against a random BERT of the same width,
depth, heads and MLP (BERT's 30522-id vocabulary, saved to a temporary directory) for text. Variants
alternate round by round; the table gives median milliseconds per step, the counted FLOPs per sample
(mmssl/flops.py) and the throughput they imply, and the foreign/native time ratio.

    .venv/bin/python benchmarks/bench_towers.py --preset small
    .venv/bin/python benchmarks/bench_towers.py --preset tiny --rounds 2 --steps 2  # smoke
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from mmssl.config import RunConfig, apply_overrides
from mmssl.flops import patch_encoder_flops, text_encoder_flops
from mmssl.model import MultimodalModel
from mmssl.presets import get_preset


def write_bert(path: Path, cfg: RunConfig) -> Path:
    """A random BERT shaped like the native text tower, with a word-level tokenizer, in ``path``."""
    import transformers

    t = cfg.model.text
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n"
    )
    transformers.BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=t.width, num_hidden_layers=t.depth, num_attention_heads=t.heads,
        intermediate_size=int(t.width * t.mlp_ratio), max_position_embeddings=max(64, t.context_length),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


def inputs(cfg: RunConfig, batch: int) -> dict[str, Tensor]:
    m = cfg.model
    text = torch.randint(5, 30000, (batch, m.text.context_length))
    text[:, 0], text[:, -1] = 2, 3  # a start and an end id: no padding, the whole context
    return {
        "image": torch.randn(batch, 3, m.image.image_size, m.image.image_size),
        "text": text,
        "audio": torch.randn(batch, m.audio.n_mels, m.audio.n_frames),
    }


def step_ms(model: MultimodalModel, modality: str, x: Tensor) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model.embed(modality, x).sum().backward()
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    args = parser.parse_args()
    torch.manual_seed(0)
    native = get_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        bert = write_bert(Path(tmp) / "bert", native)
        foreign = apply_overrides(
            get_preset(f"{args.preset}_timm"), ["model.text.kind=hf", f"model.text.hf_path={bert}"]
        )
        cfgs = {"native": native.validate(), "timm/hf": foreign.validate()}
        models = {name: MultimodalModel(cfg.model).train() for name, cfg in cfgs.items()}
        x = inputs(native, args.batch)
        times: dict[tuple[str, str], list[float]] = {}
        for model in models.values():  # warm-up
            for modality in x:
                step_ms(model, modality, x[modality])
        for _ in range(args.rounds):
            for modality in x:
                for name, model in models.items():
                    times.setdefault((modality, name), []).extend(
                        step_ms(model, modality, x[modality]) for _ in range(args.steps)
                    )
        print(f"per-step cost of one tower, forward + backward, batch {args.batch}, preset {args.preset}, "
              f"{torch.get_num_threads()} thread(s); medians of {args.rounds * args.steps} steps")  # fmt: skip
        print(
            f"{'tower':<7} {'kind':<12} {'params':>8} {'MFLOP/sample':>13} {'ms/step':>9} {'GFLOP/s':>8} {'vs native':>10}"
        )
        for modality in x:
            for name, cfg in cfgs.items():
                tower = getattr(models[name], modality)
                params = sum(p.numel() for p in tower.parameters()) / 1e6
                seen = cfg.model.text.context_length if modality == "text" else None
                if modality == "text":
                    flops = text_encoder_flops(cfg, seen)
                else:
                    patches = tower.num_patches
                    flops = patch_encoder_flops(cfg, modality, patches)
                ms = statistics.median(times[(modality, name)])
                ratio = ms / statistics.median(times[(modality, "native")])
                kind = getattr(cfg.model, modality).kind
                gflops = 3 * flops * args.batch / ms / 1e6
                print(
                    f"{modality:<7} {kind:<12} {params:>7.2f}M {flops / 1e6:>13.2f} {ms:>9.1f} {gflops:>8.2f} {ratio:>9.2f}x"
                )


if __name__ == "__main__":
    main()
