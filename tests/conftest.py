import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """A small spoken-digits build (60 digit images -> about 96 train and 24 test samples), made once."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: `make test` installs it (Debian: apt-get install espeak-ng)")
    from data_pipelines.demo import build_spoken_digits

    out = tmp_path_factory.mktemp("demo")
    build_spoken_digits(out, limit=60, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def gloo():
    """``gloo(world)``: a pool of that many gloo ranks, started once per session (see gloo_pool.py)."""
    from gloo_pool import GlooPool

    pools: dict[int, GlooPool] = {}

    def get(world: int) -> GlooPool:
        if world not in pools or not pools[world].alive:
            pools[world] = GlooPool(world)
        return pools[world]

    yield get
    for pool in pools.values():
        if pool.alive:
            pool.close()
