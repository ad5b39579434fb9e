"""Several processes, one model: torchrun's world, DistributedDataParallel and the few collectives training needs.

torchrun starts one process per device and tells each its RANK, WORLD_SIZE and LOCAL_RANK;
``lipcli train --nproc N`` starts torchrun for the user. DDP averages the gradients; Muon then shards
its Newton-Schulz and the constraint over the ranks (:class:`lipcli.optim.Muon`). Nothing here is
needed, or does anything, in a single process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank ``rank`` of ``size``, on local device ``local_rank``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files, logs and progress."""
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.size}"


SINGLE = World()


def world_from_env() -> World:
    """The world torchrun launched this process into (a single process when not launched by torchrun)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def current_world() -> World:
    """The world of the running process group, or of torchrun's environment when none is running yet."""
    if not (dist.is_available() and dist.is_initialized()):
        return world_from_env()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), cpu, cuda or cuda:N, refused with one line when torch cannot use it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device must be auto, cpu, cuda or cuda:N (got {name!r})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but torch sees no CUDA device")
    return device


def check_launch(nproc: int, device: str) -> None:
    """Reject a launch that cannot work before starting torchrun (exit 2, as for any bad input)."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1 (got {nproc})")
    if current_world().size > 1:
        raise UserError("--nproc starts torchrun itself; drop it when launching with torchrun")
    gpus = torch.cuda.device_count()
    if resolve_device(device).type == "cuda" and nproc > gpus:
        raise UserError(f"--nproc {nproc} needs {nproc} GPUs (one per process); torch sees {gpus}")


def run_torchrun(nproc: int, args: list[str]) -> int:
    """``python -m torch.distributed.run`` with ``nproc`` workers of ``lipcli train args``; its exit code."""
    # --standalone: a private rendezvous on a free port, so two jobs on one machine never collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "lipcli", "train", *args]  # fmt: skip
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached torchrun and its workers too: let them stop, checkpoint kept, and report.
        return process.wait()


def process_device(device: torch.device, world: World) -> torch.device:
    """cuda:LOCAL_RANK for each process of a multi-process CUDA job; ``device`` unchanged otherwise."""
    if device.type == "cuda" and device.index is None and world.size > 1:
        return torch.device("cuda", world.local_rank)
    return device


@contextmanager
def joined(device: torch.device) -> Iterator[World]:
    """Join torchrun's process group for the block (NCCL on CUDA, gloo on CPU) and always leave it.

    A group the caller already started is used as it is and left running.
    """
    world = current_world()
    if world.size == 1 or dist.is_initialized():
        yield world
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def local_batch_size(batch_size: int, world: World) -> int:
    """Each rank's share of the global batch; the global batch must split evenly."""
    if batch_size % world.size:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly over {world.size} processes; "
            f"use a multiple of {world.size}"
        )
    return batch_size // world.size


def data_parallel(model: nn.Module, device: torch.device, world: World) -> nn.Module:
    """``model`` wrapped in DDP (gradients averaged over ranks in backward); the model itself in one process."""
    if world.size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_ranks(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all ranks, in float64 (``values`` as given in one process)."""
    if world.size == 1:
        return values
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def mean_over_ranks(value: Tensor, world: World) -> float:
    """The mean of a scalar tensor over all ranks as a Python float (one host sync, after the reduction)."""
    if world.size == 1:
        return float(value)
    total = value.detach().double().reshape(1).clone()
    dist.all_reduce(total)
    return float(total) / world.size


def on_main(compute: Callable[[], T], world: World) -> T:
    """``compute()`` run on rank 0 alone, its result handed to every rank; its exception is raised on every rank.

    So rank 0 alone touches files, and a failure there stops all ranks the same way instead of leaving
    them waiting. The result travels pickled: keep its tensors on the CPU.
    """
    if world.size == 1:
        return compute()
    box: list[Any] = [None, None]
    if world.is_main:
        try:
            box[0] = compute()
        except Exception as exc:
            box[1] = exc
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]


def gather_sharded_state(optimizer: torch.optim.Optimizer, world: World) -> dict | None:
    """The full state_dict on rank 0 (None elsewhere) of an optimizer whose ranks each hold their own params' state.

    Every rank takes part. State travels through CPU so no rank ever touches another's GPU.
    """
    local = optimizer.state_dict()
    own_state = {index: _to_cpu(state) for index, state in local["state"].items()}
    pieces: list[dict] | None = [{} for _ in range(world.size)] if world.is_main else None
    dist.gather_object(own_state, pieces, dst=0)
    if pieces is None:
        return None
    merged = {index: state for piece in pieces for index, state in piece.items()}
    return {"state": dict(sorted(merged.items())), "param_groups": local["param_groups"]}


def _to_cpu(value: object) -> object:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
