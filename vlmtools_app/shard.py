"""Evaluation sharded across processes, merged exactly.

Launched by ``torchrun --nproc_per_node N`` (CPUs or GPUs) or ``accelerate launch --multi_gpu
--num_processes N`` (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in the
environment, on one machine or several), each process evaluates its share of the batches and
rank 0 gathers every per-item record (``torch.distributed`` over gloo, so CPUs are enough).
Records come back ordered by item index and metrics are computed once from that merged list,
so the numbers equal a one-process run's. Without those variables (``accelerate launch --cpu``
starts a single process) everything runs in this process; a process group that the caller
already started (e.g. accelerate's ``PartialState``) is used as it is.

Work is split in whole, fixed batches: batched generation pads a batch to its longest prompt
and pruning keeps as many tokens in every row of a batch, so an item's answer may depend on its
batch-mates; fixed batches keep them. Batches are dealt largest first, each to the process with
the fewest items so far (equal batches go round-robin).
"""
from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

TIMEOUT = datetime.timedelta(hours=6)
"""How long a process waits for the others (rank 0 may calibrate alone first)."""

_groups: dict[str, object] = {}


def world() -> tuple[int, int]:
    """``(rank, processes)``; joins the launcher's process group (gloo) on first use."""
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("gloo", timeout=TIMEOUT)
        atexit.register(dist.destroy_process_group)
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def _group():
    """A gloo group for Python objects, also when the launcher's group is NCCL (accelerate on GPUs)."""
    if dist.get_backend() == "gloo":
        return None
    if "gloo" not in _groups:
        _groups["gloo"] = dist.new_group(backend="gloo")
    return _groups["gloo"]


def device(kind: str = "cpu") -> torch.device:
    """``cpu``, or ``cuda``: this process's GPU (``LOCAL_RANK``), one per process."""
    if kind == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(kind)


def batches(indices: Sequence[int], size: int) -> list[list[int]]:
    """``indices`` in consecutive batches of ``size`` (the last may be shorter).

    >>> batches(range(5), 2)
    [[0, 1], [2, 3], [4]]
    """
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    indices = list(indices)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def broadcast(value):
    """Rank 0's ``value`` in every process (unchanged in one process)."""
    rank, processes = world()
    if processes == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_group())
    return box[0]


def gather(records: dict[int, object]) -> list | None:
    """On rank 0 every process's ``{item index: record}`` merged into one list in index order; None elsewhere."""
    rank, processes = world()
    parts = [records]
    if processes > 1:
        parts = [None] * processes if rank == 0 else None
        dist.gather_object(records, parts, dst=0, group=_group())
        if rank != 0:
            return None
    merged = {}
    for part in parts:
        if merged.keys() & part.keys():
            raise ValueError(f"items {sorted(merged.keys() & part.keys())[:5]} were evaluated twice")
        merged.update(part)
    return [merged[i] for i in sorted(merged)]


def owners(work: Sequence[Sequence[int]], processes: int) -> list[int]:
    """The process that runs each batch: largest first, to the one with the fewest items so far.

    >>> owners([[0, 1, 2], [3], [4, 5, 6], [7]], 2)
    [0, 0, 1, 1]
    """
    load, owner = [0] * processes, [0] * len(work)
    for b in sorted(range(len(work)), key=lambda b: -len(work[b])):
        owner[b] = min(range(processes), key=load.__getitem__)
        load[owner[b]] += len(work[b])
    return owner


def evaluate(work: Sequence[Sequence[int]], run: Callable[[list[int]], list], desc: str = "") -> list | None:
    """``run(batch)`` (one record per item index of ``batch``) over this process's share of ``work``
    (a list of batches), with a progress bar on rank 0; all records merged on rank 0 (None elsewhere).

    Every process must call it with the same ``work``.
    """
    rank, processes = world()
    mine = [list(batch) for batch, owner in zip(work, owners(work, processes)) if owner == rank]
    if processes > 1:
        desc = f"{desc} (rank 0 of {processes})".strip()
    records: dict[int, object] = {}
    with tqdm(total=sum(map(len, mine)), desc=desc, disable=rank != 0) as bar:
        for batch in mine:
            out = run(batch)
            if len(out) != len(batch):
                raise ValueError(f"run() returned {len(out)} records for a batch of {len(batch)}")
            records.update(zip(batch, out))
            bar.update(len(batch))
    return gather(records)
