"""The dp × sp process layout: torch.distributed start-up, groups, and DeepSpeed's `mpu`.

`world = dp × sp`. Sequence-parallel groups are contiguous ranks (`[0..sp-1]`, `[sp..2sp-1]`, …,
inside a node as long as sp divides the GPUs per node); data-parallel groups are the ranks with
the same position in their SP group. ZeRO shards and averages over the sequence × data group
(the whole world), which `Mpu` tells DeepSpeed.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launched_world_size() -> int:
    """`WORLD_SIZE` set by `deepspeed`, `torchrun` or mpirun, else 1."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))


def select_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported: CPU (and gloo) without CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass
class Topology:
    """Ranks and groups of one process. Groups are None in a single-process run."""

    world_size: int = 1
    rank: int = 0
    sp_size: int = 1
    sp_group: object | None = None
    dp_group: object | None = None
    local_rank: int = 0

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_sp_leader(self) -> bool:
        """The rank that decodes and scores its SP group's samples."""
        return self.sp_rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_topology(sp_size: int, *, need_distributed: bool) -> Topology:
    """Start torch.distributed (through DeepSpeed) when launched with several ranks or when the
    DeepSpeed engine is wanted, and build the contiguous SP groups and strided DP groups."""
    world = launched_world_size()
    if world == 1 and not need_distributed:
        return Topology()
    backend = select_accelerator()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(minutes=30))
    world, rank = dist.get_world_size(), dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    sp_group = dp_group = None
    for start in range(0, world, sp_size):
        ranks = list(range(start, start + sp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            sp_group = group
    for offset in range(sp_size):
        ranks = list(range(offset, world, sp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    return Topology(world_size=world, rank=rank, sp_size=sp_size, sp_group=sp_group, dp_group=dp_group,
                    local_rank=local_rank)


class Mpu:
    """The model-parallel-unit interface DeepSpeed queries (Megatron's parallel_state names):
    no tensor parallelism; sequence parallel = the SP group; ZeRO's group = the whole world."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self._world = dist.group.WORLD

    def get_sequence_parallel_group(self):
        return self.topo.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.topo.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.topo.sp_rank

    def get_sequence_data_parallel_group(self):
        return self._world

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.topo.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.topo.rank

    def get_data_parallel_group(self):
        return self.topo.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(range(self.topo.sp_rank, self.topo.world_size, self.topo.sp_size))

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self):
        return None
