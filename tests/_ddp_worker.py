"""The ranks of the multi-rank test (run as a script by tests/test_multirank.py).

The launcher imports torch, DDP (and the torch._dynamo it pulls in) and autolr once, then
forks WORLD rank processes (``torch.multiprocessing``, start method fork): each is its own
gloo rank, and none pays the seconds of imports again. Each rank trains three tiny models
(one DDP module, so one gradient all-reduce per step; one optimizer each) on its own data shard:

* A: a plain loop, ``group["lr"] = Control(run).lr(base, step=step)`` (mode 1),
* B: ``attach(optimizer, Control(run))`` (mode 1 through the optimizer hooks),
* C: ``attach(optimizer, DistributedControl(run))`` (mode 2: rank 0 polls and broadcasts).

Rank 0 logs the loss with ``autolr.log``. Writes ``OUT/rank{R}.json``: the LR every
``optimizer.step()`` used per model, the negative control (``Control.lr(base)`` without a
step) and any late-arrival warnings.

    python tests/_ddp_worker.py WORLD PORT RUN OUT STEPS BASE_LR STEP_SLEEP
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path


os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
import torch  # noqa: E402
import torch._dynamo  # noqa: E402,F401  (DDP imports it on first use: do it once, before the fork)
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import autolr  # noqa: E402
from autolr.integrations.torch import DistributedControl, attach  # noqa: E402


class _Three(torch.nn.Module):
    def __init__(self, nets: torch.nn.ModuleList):
        super().__init__()
        self.nets = nets

    def forward(self, x):
        return [net(x) for net in self.nets]


def main(rank: int, world: int, port: int, run: str, out: str, steps: int, base_lr: float, sleep: float) -> None:
    t0 = time.monotonic()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    # three tiny MLPs in one DDP module: one gradient all-reduce per step; one optimizer each
    nets = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
                               for _ in range(3))
    model = DDP(_Three(nets))
    opts = [torch.optim.SGD(net.parameters(), lr=base_lr, momentum=0.9) for net in nets]
    used: list[list[float]] = [[], [], []]
    t1 = time.monotonic()

    ctl_a = autolr.Control(run)
    attach(opts[1], autolr.Control(run))
    attach(opts[2], DistributedControl(run))
    for i, opt in enumerate(opts):  # registered after attach: sees the LR the step uses
        opt.register_step_pre_hook(lambda o, a, k, i=i: used[i].append(o.param_groups[0]["lr"]))
    unstepped = autolr.Control(run)  # negative control: no step=, in force whenever this rank reads
    naive: list[float] = []

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of the data
    w_true = torch.linspace(-1, 1, 8)
    if rank == 0:
        autolr.init(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            x = torch.randn(32, 8, generator=gen)
            y = (x @ w_true).unsqueeze(1) + 0.1 * torch.randn(32, 1, generator=gen)
            for g in opts[0].param_groups:
                g["lr"] = ctl_a.lr(base_lr, step=step)
            naive.append(unstepped.lr(base_lr))
            for opt in opts:
                opt.zero_grad()
            losses = [torch.nn.functional.mse_loss(out, y) for out in model(x)]
            sum(losses).backward()  # DDP averages the gradients over the ranks
            for opt in opts:
                opt.step()
            if rank == 0:
                autolr.log(step, loss=losses[0].detach())
            time.sleep(sleep)
    t2 = time.monotonic()
    print(f"rank {rank}: start {t1 - t0:.1f} s, {steps} steps {t2 - t1:.1f} s", flush=True)
    late = [str(w.message) for w in caught if "was due at step" in str(w.message)]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"used": used, "naive": naive, "late": late}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    a = sys.argv[1:]
    world = int(a[0])
    mp.start_processes(main, args=(world, int(a[1]), a[2], a[3], int(a[4]), float(a[5]), float(a[6])),
                       nprocs=world, start_method="fork")
