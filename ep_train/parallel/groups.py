"""The world's process group, and the expert-parallel (EP) and expert-data-parallel (EDP) groups.

Layout (the one DeepSpeed and Megatron use): EP groups are blocks of ``ep_size`` consecutive ranks;
ranks at the same position in every block hold the same experts and form an EDP group.
World 4, ep 2: EP groups [0, 1], [2, 3]; EDP groups [0, 2], [1, 3].
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ep_train.config import check_ep_layout

if TYPE_CHECKING:
    from ep_train.parallel import ParallelLayout


def ep_group_ranks(world: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    check_ep_layout(ep_size, world_size=world)
    ep = [list(range(s, s + ep_size)) for s in range(0, world, ep_size)]
    edp = [list(range(i, world, ep_size)) for i in range(ep_size)]
    return ep, edp


def new_ep_groups(ep_size: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Create every EP and EDP group (collective: all ranks must call it) and return this rank's pair."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_ranks, edp_ranks = ep_group_ranks(world, ep_size)
    mine_ep = mine_edp = None
    for ranks in ep_ranks:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine_ep = g
    for ranks in edp_ranks:
        g = dist.new_group(ranks)
        if rank in ranks:
            mine_edp = g
    assert mine_ep is not None and mine_edp is not None
    return mine_ep, mine_edp


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """The world's process group (gloo on CPU, nccl on CUDA), adopted by DeepSpeed. Returns (rank, world, device).

    Run alone (no launcher sets RANK), it is a world of one on a free local port unless MASTER_PORT
    is set: two single-process runs on one machine must not meet on a fixed port (the second would
    wait for a peer that never comes).
    """
    import deepspeed

    if "RANK" not in os.environ:  # a plain single process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        # Our own store, prefixed by torchrun's restart count: after a worker failure the restarted
        # workers would otherwise read their predecessors' stale addresses from the shared store
        # (seen with gloo under torchrun --max-restarts).
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and not agent_store, timeout=timedelta(minutes=10))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"ep_train/attempt_{attempt}", store), rank=rank,
                                world_size=world, timeout=timedelta(minutes=30))
    deepspeed.init_distributed(dist_backend=backend)  # adopts the process group above
    if not cuda:
        _release_shm_names()
        read_numa_layout_once()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def read_numa_layout_once() -> None:
    """DeepSpeed's CPU accelerator counts its devices from ``numactl --hardware`` (deepspeed/utils/numa.py),
    a new process on every ``device_count()`` call, and ZeRO-3's ``__avg_scatter_grads`` calls it for every
    gradient bucket it reduces over several ranks: 10 spawns per step of the demo model, 15 ms of a 450 ms
    step where numactl is installed (measured). The layout does not change while the process runs: read it
    once (each caller gets its own copy of the lists)."""
    import deepspeed.utils.numa as numa

    if getattr(numa.get_numa_cores, "ep_train_once", False):
        return
    read = functools.lru_cache(maxsize=1)(numa.get_numa_cores)

    def get_numa_cores() -> list[list[int]]:
        return [list(cores) for cores in read()]

    get_numa_cores.ep_train_once = True  # type: ignore[attr-defined]
    get_numa_cores.ep_train_original = numa.get_numa_cores  # type: ignore[attr-defined]
    numa.get_numa_cores = get_numa_cores


def shm_segment(rank: int) -> Path:
    """The /dev/shm file DeepSpeed 0.19.8's CPU allreduce (``deepspeed_shm_comm``, shm.cpp) creates for ``rank``."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _release_shm_names() -> None:
    """DeepSpeed's CPU shared-memory allreduce (used when LOCAL_SIZE equals the world size, as under the
    deepspeed launcher) creates one ~66 MB /dev/shm segment per rank and never unlinks it: without this,
    every run leaves them behind, RAM (tmpfs) taken until reboot (3.5 GB were found on a test machine).
    Once every rank has mapped every segment (DeepSpeed's init waits for all of them; the barrier waits
    for every rank to be past that), each rank removes its own name: the mappings stay valid until exit."""
    if os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE"):
        return  # DeepSpeed made none (the same answer on every rank: all or none enter the barrier)
    dist.barrier()  # communication
    shm_segment(dist.get_rank()).unlink(missing_ok=True)


def deepspeed_layout(ep_size: int) -> "ParallelLayout":
    """DeepSpeed's EP and EDP groups for ``ep_size`` (created once; collective) as this rank's layout."""
    from deepspeed.utils import groups

    from ep_train.parallel import ParallelLayout

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)  # collective: every rank creates every group
    return ParallelLayout(dist.get_world_size(), dist.get_rank(), ep_size,
                          ep_group=groups._get_expert_parallel_group(name),
                          edp_group=groups._get_expert_data_parallel_group(name))
