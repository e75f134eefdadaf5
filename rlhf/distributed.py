"""torch.distributed helpers: data-parallel LoRA training under ``torchrun``.

``torchrun --nproc-per-node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m
rlhf <algo> ...`` starts N x M copies of the same command with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set (PyTorch "torchrun (Elastic Launch)"). :func:`process_group`
turns that environment into a process group, ``init_process_group`` with NCCL on GPUs and
Gloo on CPUs ("Distributed communication package", backends table), each rank on the GPU of
its local rank. A process started without torchrun (WORLD_SIZE unset or 1) gets no process
group and every helper here is a no-op: world size 1, rank 0, the engine exactly as in one
process.

How the trainers use it (data parallelism as in Li et al. 2020, "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", arXiv:2006.15704):

- every rank builds the same model from the same seed (as Hugging Face Trainer and accelerate
  seed every rank alike) and :func:`broadcast_parameters` makes the trainable weights rank 0's;
- the rows of each step's global batch are split into contiguous shards (:func:`shard_bounds`);
  a rank computes its rows' loss divided by the GLOBAL normaliser (tokens, prompts, pairs,
  reduced first with :func:`all_reduce_sums`), so summing the ranks' gradients
  (:func:`all_reduce_gradients`) gives exactly the one-process gradient;
- metrics are reduced as sums and divided once; rank 0 alone writes checkpoints and metrics.

Why an explicit all-reduce of the trainable gradients rather than
``DistributedDataParallel``: the base model is frozen, so what is reduced is only the LoRA
adapters and scalar heads (megabytes), once per optimizer step, in one flattened buffer. DDP
reduces in its backward hooks, per backward call, and averages over ranks; the trainers run
several backward passes per optimizer step (gradient accumulation; PPO's policy and value
losses on two adapters of one model), switch adapters between forwards (reward, reference,
value, with parameters unused in a given forward) and normalise by global counts. Under DDP
that needs ``no_sync`` around accumulation, ``find_unused_parameters`` and a rescale of its
mean; one ``all_reduce`` before the optimizer step states the same thing directly, and the
overlap DDP buys is small for a few megabytes of adapter gradients.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset or not a number)."""
    raw = os.environ.get("WORLD_SIZE", "") or "1"
    return int(raw) if raw.isdigit() else 1


def local_rank() -> int:
    """LOCAL_RANK as torchrun sets it (0 when unset): this process's device on its node."""
    raw = os.environ.get("LOCAL_RANK", "") or "0"
    return int(raw) if raw.isdigit() else 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without a group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the rank that writes checkpoints and reports metrics."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_initialized():
        dist.barrier()


def backend_for(cuda: bool) -> str:
    """NCCL between GPUs, Gloo between CPU processes (torch.distributed's recommendation)."""
    return "nccl" if cuda else "gloo"


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the process group torchrun's environment describes (WORLD_SIZE > 1), with the
    device of LOCAL_RANK on a GPU machine, and leave it at the end. Nothing happens in one
    process, or when a group already exists (the caller that made it owns it)."""
    if env_world_size() <= 1 or is_initialized():
        yield
        return
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"backend": backend_for(cuda)}
    if cuda:
        torch.cuda.set_device(local_rank())
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(**kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def data_parallel(train: F) -> F:
    """Decorator of a trainer: run it inside :func:`process_group`."""

    @functools.wraps(train)
    def run(*args: Any, **kwargs: Any) -> Any:
        with process_group():
            return train(*args, **kwargs)

    return run  # type: ignore[return-value]


def device_for(device: torch.device) -> torch.device:
    """``device`` with its index set to this rank's GPU (LOCAL_RANK) when it is an unnumbered
    CUDA device of a multi-process run; otherwise ``device`` itself."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- sharding


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank ``rank``'s contiguous share of ``n`` items split over ``world``
    ranks; shares differ by at most one item, the first ranks taking the larger ones."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_shard(n: int) -> range:
    """The indexes of ``range(n)`` this rank works on (all of them in one process)."""
    return range(*shard_bounds(n, rank(), world_size()))


def local_part(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of ``items`` (all of them in one process)."""
    start, end = shard_bounds(len(items), rank(), world_size())
    return list(items[start:end])


# ---------------------------------------------------------------------------- reductions


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place over the ranks (``op`` "sum" or "max") and return it."""
    if not is_initialized():
        return tensor
    buf = tensor.to(_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """The sums over ranks of every value of ``values`` (the same keys on every rank), in one
    float64 all-reduce."""
    if not is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    all_reduce_(t)
    return dict(zip(keys, t.tolist(), strict=True))


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank, on every rank (e.g. a stop request)."""
    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    return bool(all_reduce_(t, "max").item())


def all_reduce_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the ranks, in one flattened fp32 buffer.

    Losses are divided by global normalisers, so the sum is the one-process gradient. A
    parameter without a gradient on a rank (no rows of a minibatch there) counts as zero; one
    without a gradient on every rank keeps ``grad = None``, as in one process, so the
    optimizer skips it there too."""
    if not is_initialized() or not params:
        return
    grads = [p.grad for p in params]
    flat = torch.cat(
        [
            (g.detach().float() if g is not None else torch.zeros_like(p, dtype=torch.float32))
            .reshape(-1)
            .to(_comm_device())
            for p, g in zip(params, grads, strict=True)
        ]
        + [torch.tensor([float(g is not None) for g in grads], device=_comm_device())]
    )
    dist.all_reduce(flat)
    present = flat[-len(params) :].tolist()  # one device sync, not one per parameter
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if present[i] > 0:
            value = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
            if p.grad is None:
                p.grad = value
            else:
                p.grad.copy_(value)
        offset += n


def broadcast_parameters(params: Sequence[torch.Tensor]) -> None:
    """Give every rank rank 0's values of ``params`` (the trainable weights, before training),
    as DistributedDataParallel does when it wraps a model."""
    if not is_initialized():
        return
    for p in params:
        buf = p.data.to(_comm_device())
        dist.broadcast(buf, src=0)
        if buf is not p.data:
            p.data.copy_(buf)


def gather_shards(local: torch.Tensor) -> torch.Tensor:
    """The concatenation, in rank order, of every rank's ``local`` tensor (its rows of a
    :func:`local_shard` split), on the CPU: what one process would have computed alone."""
    if not is_initialized():
        return local
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, local.detach().cpu())
    return torch.cat(parts)
