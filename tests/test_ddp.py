"""DDP safety: a rank whose bags all have one instance must not leave the unit without gradients.

Two CPU processes with the gloo backend and ``find_unused_parameters=False``: rank 0 gets only singleton
bags (no merges, so the unit is unused but for HAMIL's zero-weighted touch), rank 1 gets real bags. Both
must finish their steps (no hang) and end with identical parameters.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from hamil.models import build_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=2, timeout=__import__("datetime").timedelta(seconds=60)
    )
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model("hamil", 3), find_unused_parameters=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    sizes = [[1, 1, 1], [2, 3]][rank]
    for _ in range(2):
        images = torch.randint(0, 256, (sum(sizes), 3, 48, 48), dtype=torch.uint8, generator=gen)
        labels = (torch.rand(len(sizes), 3, generator=gen) < 0.5).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(images, torch.tensor(sizes)), labels
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    unit = model.module.aggregator.unit
    torch.save(
        {k: v for k, v in model.module.state_dict().items() if v.is_floating_point()}, f"{out}/rank{rank}.pt"
    )
    assert all(p.grad is not None for p in unit.parameters())
    dist.destroy_process_group()


def test_singleton_bags_do_not_break_ddp(tmp_path):
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="spawn"
    )
    for proc in ctx.processes:
        proc.join(timeout=240)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "DDP hung"
    assert all(p.exitcode == 0 for p in ctx.processes)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in a:
        if "running" not in key:  # batch-norm running statistics are per rank by design
            torch.testing.assert_close(a[key], b[key], msg=key)
