"""Expert-parallel (EP) and expert-data-parallel (EDP) process groups.

Layout (the one DeepSpeed and Megatron use): EP groups are blocks of ``ep_size`` consecutive ranks;
ranks at the same position in every block hold the same experts and form an EDP group.
World 4, ep 2: EP groups [0, 1], [2, 3]; EDP groups [0, 2], [1, 3].
"""

from __future__ import annotations

import torch.distributed as dist


def ep_group_ranks(world: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size ({ep_size}) must divide the world size ({world}); "
                         f"launch a multiple of {ep_size} processes or change parallel.ep_size")
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
