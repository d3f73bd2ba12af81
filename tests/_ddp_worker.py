"""One rank of the multi-rank test (run as a script by tests/test_multirank.py).

Trains three DDP-wrapped tiny models in lockstep on its own data shard:

* A: a plain loop, ``group["lr"] = Control(run).lr(base, step=step)`` (mode 1),
* B: ``attach(optimizer, Control(run))`` (mode 1 through the optimizer hooks),
* C: ``attach(optimizer, DistributedControl(run))`` (mode 2: rank 0 polls and broadcasts).

Rank 0 logs the loss with ``autolr.log``. Writes ``OUT/rank{R}.json``: the LR every
``optimizer.step()`` used per model, the negative control (``Control.lr(base)`` without a
step) and any late-arrival warnings.

    python tests/_ddp_worker.py RANK WORLD PORT RUN OUT STEPS BASE_LR STEP_SLEEP
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path


def main(rank: int, world: int, port: int, run: str, out: str, steps: int, base_lr: float, sleep: float) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    t0 = time.monotonic()
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import autolr
    from autolr.integrations.torch import DistributedControl, attach

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    models = [DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
              for _ in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=base_lr, momentum=0.9) for m in models]
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
            losses = []
            for model, opt in zip(models, opts):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            if rank == 0:
                autolr.log(step, loss=losses[0])
            time.sleep(sleep)
    t2 = time.monotonic()
    print(f"rank {rank}: start {t1 - t0:.1f} s, {steps} steps {t2 - t1:.1f} s", flush=True)
    late = [str(w.message) for w in caught if "was due at step" in str(w.message)]
    Path(out, f"rank{rank}.json").write_text(json.dumps({"used": used, "naive": naive, "late": late}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4], int(a[5]), float(a[6]), float(a[7]))
