"""Distributed training as users run it: 2 CPU processes (gloo), DistributedDataParallel and
FSDP2's fully_shard (each ModuleList layer, then the root) around seqkern's modules (BEATs
relative-bias attention, Emformer, the MEGA decoder, the VALL-E NAR decoder), a few SGD steps,
each rank on its half of the batch. The parameters must equal a single-process run on the
whole batch (float64: only the order of the gradient sums differs), and neither wrapper may
warn about unused parameters or grad / bucket stride mismatches.
"""

import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from seqkern import modules

try:
    from torch.distributed.fsdp import fully_shard  # FSDP2
except ImportError:
    fully_shard = None

STEPS, BATCH, LR = 3, 4, 0.05


class _Beats(torch.nn.Module):
    """Two BEATs attention layers (relative bias with the GRU gate), batch-major in and out."""

    def __init__(self):
        super().__init__()
        kw = dict(self_attention=True, num_buckets=16, max_distance=32, gru_rel_pos=True)
        # as BEATs' encoder: the first layer holds the bias table, the others reuse its bias
        self.layers = torch.nn.ModuleList(
            modules.BeatsMultiheadAttention(32, 4, has_relative_attention_bias=i == 0, **kw)
            for i in range(2)
        )

    def forward(self, x):
        x = x.transpose(0, 1)
        bias = None
        for layer in self.layers:
            out, _, bias = layer(x, x, x, need_weights=False, position_bias=bias)
            x = x + out
        return x.transpose(0, 1)


class _Emformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = modules.Emformer(24, 3, 32, 2, segment_length=4, left_context_length=3,
                                      right_context_length=2, max_memory_size=2)  # fmt: skip

    def forward(self, x):
        lengths = torch.full((x.size(0),), x.size(1) - 2)  # equal lengths: no cross-row padding
        return self.model(x, lengths)[0]


class _Mega(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = modules.MEGADecoder(11, block_size=16, linear_size=32, qk_size=8, v_size=16,
                                         num_heads=2, max_positions=64, num_blocks=2)  # fmt: skip

    def forward(self, labels):
        return self.model(labels)


class _Valle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = modules.ValleNARDecoder(3, 64, 32, 4, 2)

    def forward(self, x):
        level = (x[:, 0, 0] > 0).long() + (x[:, 0, 1] > 0).long()  # per row, not per shard
        return self.model(x, level)


MODELS = {"beats": _Beats, "emformer": _Emformer, "mega": _Mega, "valle": _Valle}


def _batch(name):
    gen = torch.Generator().manual_seed(11)
    if name == "mega":
        return torch.randint(1, 11, (BATCH, 9), generator=gen)
    dim = 24 if name == "emformer" else 32
    return torch.randn(BATCH, 15, dim, generator=gen, dtype=torch.float64)


def _build(name):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the init (zero biases, identity norms)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _train(model, batch, ddp):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        model(batch).pow(2).mean().backward()  # a mean: DDP's average over equal shards
        opt.step()
    inner = model.module if ddp else model
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    try:
        for name in MODELS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = DistributedDataParallel(_build(name))
                shard = _batch(name).chunk(world)[rank]
                try:
                    params = _train(model, shard, ddp=True)
                except RuntimeError as e:
                    raise RuntimeError(f"{name}: {e}") from e
            results[name] = (params, [str(w.message) for w in caught])
            if fully_shard is not None:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model = _build(name)
                    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
                    for child in reversed(lists):  # inner layers first, then the root
                        for layer in child:
                            if not isinstance(layer, torch.nn.ModuleList):
                                fully_shard(layer)
                    fully_shard(model)
                    params = _train(model, _batch(name).chunk(world)[rank], ddp=False)
                    params = {
                        k: getattr(v, "full_tensor", lambda v=v: v)() for k, v in params.items()
                    }
                results[name + "/fsdp2"] = (params, [str(w.message) for w in caught])
    finally:
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    out = tmp_path_factory.mktemp("ddp") / "rank0.pt"
    # the spawned processes import this file by its package path (tests.modules....), with
    # the parent's sys.path
    root = str(Path(__file__).resolve().parents[2])
    sys.path.insert(0, root)
    try:
        mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    finally:
        sys.path.remove(root)
    return torch.load(out)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", list(MODELS))
def test_two_processes_equal_one_process(ddp_results, name, wrapper):
    if wrapper == "fsdp2" and fully_shard is None:
        pytest.skip("this torch has no FSDP2 fully_shard")
    params, messages = ddp_results[name if wrapper == "ddp" else name + "/fsdp2"]
    want = _train(_build(name), _batch(name), ddp=False)
    assert list(params) == list(want)
    # Emformer's softmax is fp32 also for float64 (as upstream): a half-batch GEMM's other
    # summation order can round a logit to the neighbouring float32, ~1e-7 relative in a prob
    tol = dict(rtol=1e-6, atol=1e-9) if name == "emformer" else dict(rtol=1e-10, atol=1e-12)
    for key, value in want.items():
        torch.testing.assert_close(params[key], value, **tol, msg=lambda m, k=key: f"{k}: {m}")
    moved = [k for k, v in want.items() if not torch.equal(v, _build(name).state_dict()[k])]
    assert moved, "training changed no parameter"
    # (FSDP2 notes that a layer returns a view, as upstream's layers do: not a problem here)
    noisy = [m for m in messages if "stride" in m or "unused" in m or "DDP" in m]
    assert not noisy, noisy
