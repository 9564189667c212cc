"""uniopt's torch QHAdam on 1 vs 2 ranks (torch.distributed, gloo, CPU), seconds per step.

A ~1e6-parameter model (``Linear(1000, 1000)``, float32) under DDP (every rank steps every
parameter) and under FSDP2 ``fully_shard`` (every rank steps its half: the kernels get the
local shards). Two timings per (mode, ranks), the slowest rank's median over ``REPEAT`` steps:

* ``optimizer_step``: ``opt.step()`` alone, gradients in ``.grad`` (the Numba table kernel on
  the rank's parameters or shards);
* ``train_step``: ``zero_grad`` + forward + backward (DDP's all-reduce, FSDP2's all-gather and
  reduce-scatter) + ``opt.step()`` on a batch of 64 rows per rank.

Each rank runs one torch thread and uniopt's serial kernels. The ranks are spawned from a fresh
interpreter running this file (``python asv_bench/benchmarks/distributed.py``, which prints the
table and the 2-rank / 1-rank ratios; ``--json PATH`` writes the numbers instead). Reported, never
asserted: on a shared machine the 2-rank figures also measure how busy the other core is.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MODES = ["ddp", "fsdp2"]
RANKS = [1, 2]
WIDTH = 1000  # Linear(WIDTH, WIDTH): WIDTH * (WIDTH + 1) parameters
BATCH = 64
REPEAT = 20
WARMUP = 3


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from uniopt.adapters.torch import QHAdam

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(BATCH, WIDTH, generator=gen)
        y = torch.randn(BATCH, WIDTH, generator=gen)
        for mode in MODES:
            torch.manual_seed(0)
            inner = torch.nn.Linear(WIDTH, WIDTH)
            if mode == "fsdp2":
                fully_shard(inner)
                model = inner
            else:
                model = DistributedDataParallel(inner)
            opt = QHAdam(model.parameters(), lr=1e-4, nus=(0.7, 1.0))

            def train_step():
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()

            for _ in range(WARMUP):  # kernels compiled / loaded, state created
                train_step()
            timings = {"optimizer_step": [], "train_step": []}
            for _ in range(REPEAT):
                dist.barrier()
                start = time.perf_counter()
                opt.step()
                timings["optimizer_step"].append(time.perf_counter() - start)
            for _ in range(REPEAT):
                dist.barrier()
                start = time.perf_counter()
                train_step()
                timings["train_step"].append(time.perf_counter() - start)
            for key, values in timings.items():
                median = torch.tensor([statistics.median(values)], dtype=torch.float64)
                dist.all_reduce(median, op=dist.ReduceOp.MAX)  # the slowest rank
                results[f"{mode}/{world}/{key}"] = float(median)
        if rank == 0:
            params = sum(p.numel() for p in torch.nn.Linear(WIDTH, WIDTH).parameters())
            results["params"] = params
            with open(os.path.join(out, f"world{world}.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def measure() -> dict:
    """Every (mode, ranks) timing: ``{"ddp/1/optimizer_step": seconds, ..., "params": n}``."""
    import torch.multiprocessing as mp

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for world in RANKS:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(_rank, args=(world, port, out), nprocs=world, start_method="spawn")
            with open(os.path.join(out, f"world{world}.json")) as f:
                results.update(json.load(f))
    return results


def _measure_in_a_fresh_interpreter() -> dict:
    """:func:`measure` run by this file as a script (spawned ranks re-import ``__main__``)."""
    with tempfile.TemporaryDirectory() as out:
        path = os.path.join(out, "distributed.json")
        env = dict(os.environ, UNIOPT_BENCH_PIN="0")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--json", path], check=True,
                       env=env, timeout=1200)
        with open(path) as f:
            return json.load(f)


class DistributedQHAdam:
    """asv: seconds per step, per mode (DDP, FSDP2), ranks (1, 2) and what is timed."""

    params = [MODES, RANKS, ["optimizer_step", "train_step"]]
    param_names = ["mode", "ranks", "timed"]
    timeout = 1200

    def setup_cache(self):
        return _measure_in_a_fresh_interpreter()

    def track_seconds(self, results, mode, ranks, timed):
        return results[f"{mode}/{ranks}/{timed}"]

    track_seconds.unit = "seconds"


def _table(results: dict) -> str:
    lines = [f"uniopt QHAdam, {results['params']:,} float32 parameters, gloo on CPU, one torch "
             f"thread per rank; median seconds per step, slowest rank",
             "| mode | timed | 1 rank | 2 ranks | 2 / 1 |", "|---|---|---|---|---|"]
    for mode in MODES:
        for timed in ("optimizer_step", "train_step"):
            one, two = results[f"{mode}/1/{timed}"], results[f"{mode}/2/{timed}"]
            lines.append(f"| {mode} | {timed} | {one * 1e3:.2f} ms | {two * 1e3:.2f} ms | "
                         f"{two / one:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if hasattr(os, "sched_setaffinity"):  # asv's process may be pinned to one CPU: not the ranks
        try:
            os.sched_setaffinity(0, range(os.cpu_count()))
        except OSError:
            pass
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        with open(sys.argv[2], "w") as f:
            json.dump(measure(), f)
    else:
        print(_table(measure()))
