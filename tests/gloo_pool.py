"""Gloo ranks shared by the tests that check a collective against one process.

Spawning ranks costs each of them the torch/open_clip import (~7 s of CPU on this machine) and the
process-group rendezvous; the distributed loss tests need only a few milliseconds of work each. So a
session keeps one pool per world size: its ranks join one gloo group once and then run whatever
module-level function a test hands them, ``fn(rank, world, *args)``, returning each rank's result.

A rank whose function raises reports its traceback; the test fails with it, and since the other ranks
may then wait in a collective that never completes, that pool is torn down and rebuilt for the next
test.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from mmssl.ranks import free_port

TIMEOUT_S = 600  # one test's work on a loaded 2-core machine, with margin


def _serve(rank: int, world: int, port: int, tasks: Any, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, None, fn(rank, world, *args)))
        except BaseException:  # report it to the test, keep serving
            results.put((rank, traceback.format_exc(), None))
    # no destroy_process_group: it synchronises the ranks, and the process ends here anyway


def launcher_env(rank: int, world: int) -> dict[str, str]:
    """What DeepSpeed's launcher puts in a rank's environment (the pool's address and port are set)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}


def engine_rank(rank: int, world: int) -> Any:
    """This pool rank as mmssl's engine sees a launched one: the launcher's environment, then
    ``engine.init_distributed``, which joins the pool's process group. Returns its ``DistInfo``."""
    from mmssl import engine

    os.environ.update(launcher_env(rank, world))
    return engine.init_distributed()


def mmssl_rank(rank: int, world: int, argv: list[str]) -> str:
    """``mmssl <argv>`` on this rank as the launcher would run it there (rank, world size in the
    environment; one thread per rank on the CPU), minus the process start-up and imports a launched run
    pays. The process group is the pool's and outlives the command: mmssl's shutdown at its end is
    skipped. Returns what the command printed; a command that exits non-zero raises with it."""
    from mmssl import cli, ranks

    env = launcher_env(rank, world)
    saved = {k: os.environ.get(k) for k in env}
    threads, shutdown = torch.get_num_threads(), ranks.shutdown
    os.environ.update(env)
    torch.set_num_threads(1)
    ranks.shutdown = lambda: None
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        ranks.shutdown = shutdown
        torch.set_num_threads(threads)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if code:
        raise RuntimeError(
            f"mmssl {argv[0]} exited with {code} on rank {rank}:\n{printed.getvalue()[-3000:]}"
        )
    return printed.getvalue()


def _collect(rank: int, fn: Callable[..., Any], args: tuple, out: Any) -> None:
    out[rank] = fn(rank, *args)


def spawned(fn: Callable[..., Any], *args: Any, nprocs: int = 1) -> list[Any]:
    """``fn(rank, *args)`` in ``nprocs`` fresh processes (``torch.multiprocessing.spawn``), for a test
    whose ranks must not be the pool's (a process group or a device of their own, joined and left by
    ``fn``); each rank's result, in rank order. ``fn`` must be importable (a module-level function) and
    its result picklable; a rank that raises fails the test with its traceback."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_collect, args=(fn, args, out), nprocs=nprocs, join=True)
        return [out[rank] for rank in range(nprocs)]


class GlooPool:
    def __init__(self, world: int):
        ctx = mp.get_context("spawn")
        self.world = world
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        self.port = port = free_port()
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, port, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(rank, world, *args)`` on every rank; the results in rank order. ``fn`` must be importable
        (a module-level function) and its results picklable."""
        for tasks in self.tasks:
            tasks.put((fn, args))
        out: dict[int, Any] = {}
        errors = []
        try:
            for _ in range(self.world):
                rank, error, value = self.results.get(timeout=TIMEOUT_S)
                if error:
                    errors.append(f"rank {rank}:\n{error}")
                    break  # the others may be stuck in a collective
                out[rank] = value
        except queue.Empty:
            errors.append(
                f"no answer from ranks {sorted(set(range(self.world)) - set(out))} in {TIMEOUT_S} s"
            )
        if errors:
            self.close(force=True)
            raise AssertionError("\n".join(errors))
        return [out[r] for r in range(self.world)]

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, *, force: bool = False) -> None:
        if force:
            for p in self.procs:
                p.kill()
        else:
            for tasks in self.tasks:
                tasks.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        from mmssl.ranks import remove_shm_buffers

        remove_shm_buffers(self.port)  # DeepSpeed's shared-memory all-reduce buffers, named after the port
