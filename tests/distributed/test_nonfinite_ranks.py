"""A non-finite loss on one DDP rank: every rank skips that step together (no hang in the all-reduce).

Two gloo processes on CPU; a collective timeout and a join deadline turn a regression into a failure
instead of a hung CI run.
"""
import datetime
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import tiny_model, toy_batch
from torch.nn.parallel import DistributedDataParallel as DDP

from r3f_opt import RegularizedOptimizer

WORLD, STEPS, POISONED = 2, 3, 1  # rank 1's loss is NaN at step 1


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    try:
        _run(rank, out_dir)
    finally:  # DDP lived and died inside _run: none of it outlives the group (that aborted the process at exit)
        gc.collect()
        dist.destroy_process_group()


def _run(rank: int, out_dir: str) -> None:
    torch.manual_seed(0)
    model = DDP(tiny_model("bert", dropout=0.0))
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, eps=1e-2, seed=rank)
    skipped = []
    for step in range(STEPS):
        batch = toy_batch("bert", batch=4, seq=6, seed=10 * step + rank)

        def closure():
            out = model(**batch)
            bad = rank == 1 and step == POISONED
            return (out.loss * float("nan") if bad else out.loss), out.logits

        opt.zero_grad()
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            skipped.append(opt.step(closure).skipped)
    torch.save({"skipped": skipped, "nonfinite": opt.nonfinite_steps,
                "params": {k: v.detach().clone() for k, v in model.module.state_dict().items()}},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_one_rank_nonfinite_all_ranks_skip(tmp_path):
    ctx = mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("the ranks hung: a skip decided on one rank only leaves the other in the all-reduce")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    want = [step == POISONED for step in range(STEPS)]
    assert r0["skipped"] == want and r1["skipped"] == want
    assert r0["nonfinite"] == r1["nonfinite"] == 1
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
        assert torch.isfinite(v).all(), k
