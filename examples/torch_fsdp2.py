"""Sharded training (FSDP2 ``fully_shard``) with uniopt's QHAdam on two processes (gloo, CPU),
with a ``torch.distributed.checkpoint`` save and resume half-way.

Each rank holds a shard of every parameter (DTensors) and half of every batch. QHAdam runs its
Numba kernels on each rank's local shard; FSDP2 averages the gradients. After half the steps
the model and optimizer state are saved with ``dcp.save`` (``get_model_state_dict`` /
``get_optimizer_state_dict``), loaded into a freshly built model and optimizer, and training
continues. The script runs the same training in this process on the whole batch without
interruption and checks that the two ranks hold bitwise equal copies of the whole model and
that they equal the single-process run to 1e-12 (float64); it exits non-zero otherwise.

Run: python examples/torch_fsdp2.py
"""

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from uniopt.adapters.torch import QHAdam

WORLD, STEPS = 2, 30


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def make_optimizer(model) -> QHAdam:
    return QHAdam(model.parameters(), lr=0.02, betas=(0.9, 0.999), nus=(0.7, 1.0), weight_decay=1e-4)


def make_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def train(model, opt, x, y, steps: int) -> float:
    """``steps`` QHAdam steps on the mean squared error; the last loss (this rank's batch)."""
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return float(loss)


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y = make_data()
        rows = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)  # this rank's half
        model = make_model()
        fully_shard(model)  # parameters become DTensors: each rank keeps its shard
        opt = make_optimizer(model)
        train(model, opt, x[rows], y[rows], STEPS // 2)
        checkpoint = os.path.join(out, "checkpoint")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=checkpoint)
        # a fresh model (other initial weights) and optimizer, resumed from the checkpoint
        model = make_model(seed=1)
        fully_shard(model)
        opt = make_optimizer(model)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=checkpoint)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        train(model, opt, x[rows], y[rows], STEPS - STEPS // 2)
        params = [p.full_tensor().detach() for p in model.parameters()]  # a collective
        torch.save(params, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(port, out), nprocs=WORLD, start_method="spawn")
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
    x, y = make_data()
    single = make_model()
    with torch.no_grad():
        first = float(torch.nn.functional.mse_loss(single(x), y))
    last = train(single, make_optimizer(single), x, y, STEPS)
    equal = all(torch.equal(a, b) for a, b in zip(ranks[0], ranks[1]))
    rel = max(float((a - b.detach()).abs().max() / b.detach().abs().max())  # per tensor
              for a, b in zip(ranks[0], single.parameters()))
    print(f"loss {first:.6f} -> {last:.6f} in {STEPS} steps (saved and resumed after {STEPS // 2})")
    print(f"the {WORLD} ranks' models are {'bitwise equal' if equal else 'DIFFERENT'}; largest relative "
          f"difference from the uninterrupted single-process full-batch run: {rel:.1e}")
    print(f"result replicas_equal={int(equal)} max_rel_diff={rel:.3e} first_loss={first:.9f} "
          f"last_loss={last:.9f}")
    return 0 if equal and rel <= 1e-12 and last < first else 1


if __name__ == "__main__":
    sys.exit(main())
