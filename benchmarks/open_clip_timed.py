"""``python -m open_clip_train.main`` with its step and data times logged at full precision.

open_clip_train logs each window's mean step time as ``Batch (t): 0.071`` (3 decimals: a 0.7% step at
70 ms). Run with the baseline's interpreter in its place, this prints the same means with 9 decimals, so
the side-by-side (bench_vs_open_clip.py) times open_clip from its own per-step timing, not a rounded
string. Nothing else changes: the meters' values, the loop and the arguments are open_clip's.
"""

import runpy
import sys

from open_clip_train import train


class _Exact(float):
    """A float that prints fixed-point formats with 9 decimals (``:.3f`` -> ``:.9f``)."""

    def __format__(self, spec: str) -> str:
        return format(float(self), ".9f" if spec.endswith("f") else spec)


_update = train.AverageMeter.update


def _exact_update(self, val, n=1):
    _update(self, val, n)
    self.avg = _Exact(self.avg)


train.AverageMeter.update = _exact_update

if __name__ == "__main__":
    sys.argv[0] = "open_clip_train.main"
    runpy.run_module("open_clip_train.main", run_name="__main__", alter_sys=True)
