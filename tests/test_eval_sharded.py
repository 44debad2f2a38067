"""Sharded evaluation on 2 gloo ranks equals the one-process evaluation, figure for figure.

Three held-out shards of unequal size go to 2 ranks (shards 0 and 2 to rank 0, shard 1 to rank 1),
so the ranks run different numbers of batches and rank 1 must keep stepping with dummy inputs; some
samples lack their audio. The probe's train split is one shard, so rank 1 gets none of it. Retrieval,
zero-shot and the linear probe are all compared."""

import os

import pytest
import torch
import torch.distributed as dist
from gloo_pool import spawned

from data_pipelines import synthetic_samples, write_shards
from mmssl.eval.embeddings import embed_split
from mmssl.eval.run import EvalPlan, run_eval
from mmssl.model import MultimodalModel
from mmssl.presets import tiny
from mmssl.ranks import free_port

pytestmark = pytest.mark.distributed
CLASSES = [f"class {i}" for i in range(10)]


def setup(shards: dict) -> tuple[MultimodalModel, object, EvalPlan]:
    cfg = tiny()
    cfg.eval.batch_size = 4
    cfg.data.num_workers = 0
    cfg.data.eval_shards = shards["test"]
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model).eval()
    return model, cfg, EvalPlan(probe_shards=shards["train"], classes=CLASSES)


def evaluate(shards: dict, out_dir, rank: int = 0, world_size: int = 1):
    model, cfg, plan = setup(shards)
    cpu = torch.device("cpu")
    results = run_eval(
        model, cfg, out_dir, device=cpu, plan=plan, rank=rank, world_size=world_size, progress=False
    )
    embeddings = embed_split(model, cfg, shards["test"], device=cpu, rank=rank, world_size=world_size)
    return results, embeddings


def _rank(rank: int, world: int, port: int, shards: dict, out_dir) -> tuple:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = evaluate(shards, out_dir / f"rank{rank}", rank, world)
    dist.destroy_process_group()
    return result


def test_two_rank_eval_equals_one_process(tmp_path):
    test = write_shards(
        synthetic_samples(25, seed=5, image_size=32, drop={"wav": 0.2}), tmp_path / "test", max_count=10
    )
    train = write_shards(synthetic_samples(40, seed=6, image_size=32), tmp_path / "train", max_count=40)
    shards = {"test": test["pattern"], "train": train["pattern"]}
    assert list(test["shards"].values()) == [10, 10, 5]

    sharded = spawned(_rank, 2, free_port(), shards, tmp_path, nprocs=2)
    single, single_emb = evaluate(shards, tmp_path / "single")

    for rank in (0, 1):
        results, emb = sharded[rank]
        assert emb.keys == single_emb.keys and len(emb.keys) == 25
        assert torch.equal(emb.labels, single_emb.labels)
        for m in single_emb.emb:
            assert torch.equal(emb.present[m], single_emb.present[m])
            torch.testing.assert_close(emb.emb[m], single_emb.emb[m], rtol=0, atol=1e-6)
        assert results == single, rank  # every figure: retrieval, zero-shot, probe
    assert set(single) >= {"pairs", "zeroshot", "probe"} and len(single["pairs"]) == 6
    assert single["pairs"]["image->audio"]["queries"] < 25  # samples without audio are left out
    assert (tmp_path / "rank0" / "eval.json").is_file() and not (tmp_path / "rank1").exists()
