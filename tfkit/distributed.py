"""Training on several processes: torchrun starts one per device, every process builds the same global
batch and keeps its slice, and together they take the step one process would take on the whole batch.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK. Without them tfkit trains as one process and every
collective here returns its input.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tfkit.errors import TfkitError, UsageError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone prints, writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


class LostRank(TfkitError):
    """Another rank stopped answering: it failed (its error is in its own output) or was killed."""

    def __init__(self, error: BaseException):
        super().__init__(
            f"lost contact with the other processes ({type(error).__name__}); one of them failed or was killed, and "
            "its own error says why (a rank that hangs is given up after train.timeout seconds)"
        )


def lost_rank(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank is gone or hangs: gloo and nccl
    raise plain RuntimeErrors for it from inside backward as well as from our own collectives."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError)
        and any(
            mark in str(error)
            for mark in ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Timed out")
        )
    )


def from_environment() -> Ranks:
    env = os.environ
    if "WORLD_SIZE" not in env:
        return Ranks()
    try:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except (KeyError, ValueError) as e:
        raise UsageError(f"WORLD_SIZE is set but RANK/LOCAL_RANK are missing or not numbers ({e}); start with torchrun") from e


@contextmanager
def process_group(ranks: Ranks, device: torch.device, timeout_s: float) -> Iterator[torch.device]:
    """Join the other ranks (nccl on CUDA, gloo on CPU) for the duration; yields this rank's device."""
    if not ranks.active:
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=ranks.rank,
        world_size=ranks.world,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield device
    finally:
        dist.destroy_process_group()


def all_reduce(tensor: Tensor, ranks: Ranks) -> Tensor:
    """Σ over ranks, in place."""
    if ranks.active:
        dist.all_reduce(tensor)
    return tensor


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` on every rank (picklable values)."""
    if not ranks.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``value``, in rank order (picklable values)."""
    if not ranks.active:
        return [value]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss depends on the sum
        return grad, None


_model_group: tuple[Any, Any] = (None, None)  # (the default group it belongs to, the group)


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """Σ over ranks of a tensor computed inside the model (batch statistics), differentiable.

    It runs on a process group of its own: DDP and FSDP reduce gradients on the default group while
    backward runs, and collectives of one group must come in the same order on every rank, which
    interleaving the two would not guarantee (a rank with fewer rows runs a different graph)."""
    global _model_group
    if _model_group[0] is not dist.group.WORLD:
        _model_group = (dist.group.WORLD, dist.new_group())
    return _SumOverRanks.apply(tensor, _model_group[1])


def wrap(model: nn.Module, ranks: Ranks, strategy: str, device: torch.device, block_types: tuple[type, ...]) -> nn.Module:
    """The module the training step runs: the model itself on one process; DDP replicas, or with
    ``fsdp`` the model sharded in place by ``fully_shard``, one unit per block and one for the rest."""
    if not ranks.active:
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules()):
        if isinstance(module, block_types):
            fully_shard(module)
    fully_shard(model)
    return model


@contextmanager
def gradient_sync(step_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on the inner steps of gradient accumulation."""
    if enabled:
        yield
    elif isinstance(step_model, nn.parallel.DistributedDataParallel):
        with step_model.no_sync():
            yield
    elif hasattr(step_model, "set_requires_gradient_sync"):  # FSDP
        step_model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            step_model.set_requires_gradient_sync(True)
    else:
        yield
