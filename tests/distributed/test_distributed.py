"""RegularizedOptimizer under DistributedDataParallel, FSDP1 and FSDP2 (fully_shard): 2 processes on CPU (gloo).

Every rank must end with identical parameters (and R4F buffers), equal to one process stepping over the
combined batch with the same noise; accumulation must keep the micro-batches' gradients local (no_sync)
until the last one. The workers run all scenarios in one spawn; the tests compare what they saved.
"""
import copy
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import settings, tiny_model, toy_batch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from r3f_opt import RegularizedOptimizer, apply_r4f
from r3f_opt.noise import EmbeddingNoise

WORLD = 2
STEPS = 3
EPS = 1e-2
SCENARIOS = {"r3f": dict(method="r3f"), "r4f": dict(method="r4f"), "r3f_accum": dict(method="r3f"),
             "fsdp2_r3f": dict(method="r3f"), "fsdp2_r4f": dict(method="r4f"), "fsdp2_accum": dict(method="r3f"),
             # FSDP1 with flat parameters (its default) and with use_orig_params=True (Accelerate's, torch.compile's)
             "fsdp1_r3f": dict(method="r3f"), "fsdp1_r4f": dict(method="r4f"), "fsdp1_accum": dict(method="r3f"),
             # R-Drop's own "sum" reduction depends on the world size (each rank sums its rows, DDP averages)
             "rdrop": dict(method="rdrop", reduction="batchmean"),
             "smart": dict(method="smart", method_kwargs={"step_size": 1e-2, "epsilon": 1e-2}),
             "freelb": dict(method="freelb"), "freelb_accum": dict(method="freelb")}


def batches(step: int) -> dict:
    """The global batch of a step: 8 examples; rank r takes rows [4r, 4r + 4)."""
    return toy_batch("bert", batch=4 * WORLD, seq=6, seed=10 + step)


def shard(batch: dict, rank: int, parts: int = WORLD) -> dict:
    n = batch["input_ids"].shape[0] // parts
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def make(kw: dict, seed: int):
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    opt = RegularizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, seed=seed, **kw,
                               **settings(kw["method"], eps=EPS))
    return model, opt


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        _run(rank, out_dir)
    finally:  # DDP/FSDP lived and died inside _run: none of it outlives the group (that can abort at exit)
        gc.collect()
        dist.destroy_process_group()


def _run(rank: int, out_dir: str) -> None:
    results = {}
    torch.manual_seed(0)
    model = tiny_model("bert", dropout=0.0)
    try:
        RegularizedOptimizer(torch.optim.SGD(model.parameters()), DDP(model, find_unused_parameters=True))
        results["find_unused_error"] = None
    except ValueError as e:
        results["find_unused_error"] = str(e)
    try:
        RegularizedOptimizer(torch.optim.SGD(model.parameters()), DDP(model), method="r4f")
        results["r4f_after_ddp_error"] = None
    except ValueError as e:
        results["r4f_after_ddp_error"] = str(e)
    for name, kw in SCENARIOS.items():
        torch.manual_seed(0)
        model = tiny_model("bert", dropout=0.0)  # dropout would draw differently per process
        if rank == 1:
            torch.rand(7)  # rank 1's RNG now differs: R4F's random u, v must come from rank 0
        if kw["method"] == "r4f":
            apply_r4f(model)  # before DDP / FSDP: it re-registers the head's weight
        if name.startswith("fsdp2"):  # FSDP2 (fully_shard) on CPU with gloo
            for layer in model.bert.encoder.layer:
                fully_shard(layer)
            ddp = fully_shard(model)
        elif name.startswith("fsdp1"):  # each layer its own unit, as a transformer auto-wrap policy makes them
            fsdp1 = dict(device_id=torch.device("cpu"), use_orig_params=name == "fsdp1_r4f")
            layers = model.bert.encoder.layer
            for i in range(len(layers)):
                layers[i] = FSDP1(layers[i], **fsdp1)
            ddp = FSDP1(model, **fsdp1)
        else:
            ddp = DDP(model, find_unused_parameters=False)
        opt = RegularizedOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.5), ddp, seed=100 + rank, **kw,
                                   **settings(kw["method"], eps=EPS))
        kept_local = []
        for step in range(STEPS):
            opt.zero_grad()
            local = shard(batches(step), rank)
            if not name.endswith("accum"):
                opt.step(lambda: ddp(**local))
                continue
            first, second = shard(local, 0, 2), shard(local, 1, 2)  # two micro-batches per rank
            opt.backward(lambda: ddp(**first), weight=0.5, sync=False)
            if name == "r3f_accum":  # DDP: each rank must still hold only its own gradient
                mine = torch.cat([p.grad.flatten() for p in ddp.parameters()])
                other = [torch.zeros_like(mine) for _ in range(WORLD)]
                dist.all_gather(other, mine)
                kept_local.append(not torch.allclose(other[0], other[1]))
            if name == "fsdp1_accum":  # FSDP1's no_sync keeps the whole local gradient, not a reduced shard
                kept_local.append(all(p.grad.numel() == WORLD * p.numel() for p in ddp.parameters()))
            opt.backward(lambda: ddp(**second), weight=0.5)
            opt.step()
        results[name] = dict(
            state=_full(ddp if name.startswith("fsdp1") else model),
            kept_local=kept_local,
        )
    results["fsdp2_resume"] = _fsdp2_resume(rank)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _full(model) -> dict:
    if isinstance(model, FSDP1):  # its flat parameters gathered, the original names restored
        return {k: v.detach().clone()
                for k, v in get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)).items()}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def _fsdp2_resume(rank: int) -> dict:
    """docs/distributed.md's recipe: DCP's helpers save and restore the model and the inner optimizer (they
    drop the wrapper's "r3f" entry), the entry is saved beside them and loaded back with
    ``opt.load_state_dict({**opt.optimizer.state_dict(), "r3f": entry})``. Three runs of STEPS steps:
    uninterrupted; resumed after step 0 with the entry; resumed without it."""
    def build():
        torch.manual_seed(0)
        model = tiny_model("bert", dropout=0.0)
        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        return model, RegularizedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, eps=EPS,
                                           seed=200 + rank)

    def steps(model, opt, which):
        for step in which:
            opt.zero_grad()
            local = shard(batches(step), rank)
            opt.step(lambda: model(**local))

    model, opt = build()
    steps(model, opt, [0])
    saved = copy.deepcopy((get_model_state_dict(model), get_optimizer_state_dict(model, opt.optimizer),
                           opt.state_dict()["r3f"]))
    steps(model, opt, range(1, STEPS))
    out = {"uninterrupted": _full(model)}
    for name, with_entry in (("resumed", True), ("resumed_without_entry", False)):
        model, opt = build()
        msd, osd, entry = copy.deepcopy(saved)
        set_model_state_dict(model, msd)
        set_optimizer_state_dict(model, opt.optimizer, osd)
        if with_entry:
            opt.load_state_dict({**opt.optimizer.state_dict(), "r3f": entry})
        steps(model, opt, range(1, STEPS))
        out[name] = _full(model)
    return out


def single_process(name: str) -> dict:
    """One process over the combined batch, with the noise each rank drew for its rows."""
    kw = SCENARIOS[name]
    model, opt = make(kw, seed=0)
    if opt.noise is None:  # R-Drop: nothing to draw
        per_rank = []
    else:
        per_rank = [EmbeddingNoise(opt.noise.module, None, opt.noise.eps, opt.noise.noise, True, seed=100 + r)
                    for r in range(WORLD)]
    micro = 2 if name.endswith("accum") else 1

    def sample(shape, device):  # rows of rank r come from rank r's generator, in its order of draws
        rows = shape[0] // WORLD
        return torch.cat([n.sample((rows, *shape[1:]), device) for n in per_rank])

    if opt.noise is not None:
        opt.noise.sample = sample
    for step in range(STEPS):
        opt.zero_grad()
        full = batches(step)
        for m in range(micro):  # micro-batch m of every rank, stacked
            part = {k: torch.cat([shard(shard(full, r), m, micro)[k] for r in range(WORLD)]) for k in full}
            opt.backward(lambda: model(**part), weight=1.0 / micro)
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_agree_and_match_one_process(ranks, name):
    r0, r1 = ranks[0][name]["state"], ranks[1][name]["state"]
    for k in r0:  # identical on every rank, R4F's u and v included
        assert torch.equal(r0[k], r1[k]), k
    want = single_process(name)
    start = make(SCENARIOS[name], seed=0)[0].state_dict()
    assert any(not torch.equal(start[k], want[k]) for k in want)  # the steps did change something
    for k in want:
        torch.testing.assert_close(r0[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    if name == "r4f":
        assert any(k.endswith("_u") for k in r0)


def test_fsdp2_checkpoint_recipe_resumes_the_same_noise(ranks):
    """Saved with DCP's helpers plus the "r3f" entry beside them, a resumed FSDP2 run continues exactly as the
    uninterrupted one; without the entry it draws other noise and ends elsewhere."""
    for r in ranks:
        got = r["fsdp2_resume"]
        for k, v in got["uninterrupted"].items():
            torch.testing.assert_close(got["resumed"][k], v, rtol=0, atol=0, msg=k)
        assert any(not torch.equal(got["resumed_without_entry"][k], v) for k, v in got["uninterrupted"].items())


def test_accumulation_keeps_micro_batch_gradients_local(ranks):
    # After backward(sync=False) each rank still holds only its own gradient (different data per rank);
    # under FSDP1 that gradient is the unsharded one (a synced backward leaves each rank its reduced shard).
    for r in ranks:
        assert r["r3f_accum"]["kept_local"] == [True] * STEPS
        assert r["fsdp1_accum"]["kept_local"] == [True] * STEPS


def test_find_unused_parameters_is_refused_with_the_fix(ranks):
    assert "find_unused_parameters=False" in ranks[0]["find_unused_error"]


def test_r4f_after_wrapping_is_refused_with_the_fix(ranks):
    assert "apply_r4f(model) before wrapping" in ranks[0]["r4f_after_ddp_error"]
