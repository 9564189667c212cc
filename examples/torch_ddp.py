"""Data-parallel training (DDP) with uniopt's PolyakSGD on two processes (gloo, CPU).

Each of the 2 ranks holds a replica of the model (``DistributedDataParallel``) and half of
every batch. DDP averages the gradients; PolyakSGD averages its loss over ``process_group``
(by default the world group, once ``torch.distributed`` is initialised), so every rank takes
the Polyak step size of one process on the whole batch. The script runs the same training in
this process on the whole batch and checks that the replicas are bitwise equal to each other
and equal to that single-process run to 1e-12 (float64); it exits non-zero otherwise.

Run: python examples/torch_ddp.py
"""

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from uniopt.adapters.torch import PolyakSGD

WORLD, STEPS = 2, 30


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()


def make_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def train(model, x, y) -> list:
    """``STEPS`` PolyakSGD steps on the mean squared error; the losses seen."""
    opt = PolyakSGD(model.parameters(), max_stepsize=0.5, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        losses.append(opt.last_step[0]["loss"])  # the loss averaged over the ranks
    return losses


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, y = make_data()
        rows = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)  # this rank's half
        model = make_model()
        losses = train(DistributedDataParallel(model), x[rows], y[rows])
        torch.save({"params": [p.detach() for p in model.parameters()], "losses": losses},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(port, out), nprocs=WORLD, start_method="spawn")
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]
    single = make_model()
    x, y = make_data()
    losses = train(single, x, y)
    equal = all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    rel = max(float((a - b.detach()).abs().max() / b.detach().abs().max())  # per tensor
              for a, b in zip(ranks[0]["params"], single.parameters()))
    print(f"loss {losses[0]:.6f} -> {losses[-1]:.6f} in {STEPS} steps on {WORLD} ranks")
    print(f"the {WORLD} DDP replicas are {'bitwise equal' if equal else 'DIFFERENT'}; largest relative "
          f"difference from the single-process full-batch run: {rel:.1e}")
    print(f"result replicas_equal={int(equal)} max_rel_diff={rel:.3e} "
          f"first_loss={losses[0]:.9f} last_loss={losses[-1]:.9f}")
    return 0 if equal and rel <= 1e-12 and losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
