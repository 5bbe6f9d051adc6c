"""This process's part of a datalist in a distributed run, so each rank reads and caches only its own scans.

``DistributedSampler`` splits a dataset that every rank has built in full: with a
``CacheDataset`` each rank would load and cache every scan, and a datalist shard wrapped in a
``DistributedSampler`` again would be split twice (each rank keeping 1/N of its 1/N). So the
bundles' ``multi_gpu_train.json`` apply the sampler's split to the datalist instead, before the
dataset is built, and shuffle each rank's shard locally::

    "train#dataset#datalist": "$medssl.data.sharding.rank_shard(@train_datalist, even_divisible=True, name='train_datalist')"
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from monai.data import partition_dataset

from medssl.data.datalists import shard_datalist

__all__ = ["rank_shard"]


def rank_shard(
    datalist: Sequence[dict],
    even_divisible: bool = True,
    name: str = "datalist",
    rank: int | None = None,
    world_size: int | None = None,
) -> list[dict]:
    """The items of ``datalist`` that process ``rank`` of ``world_size`` loads, dealt round-robin.

    The split is ``DistributedSampler``'s without shuffling: ``datalist[rank::world_size]``.
    ``even_divisible=True`` (training) pads the shards by repeating items so every rank runs the
    same number of iterations (DistributedDataParallel's gradient all-reduce needs that);
    ``even_divisible=False`` (validation) gives every item to exactly one rank, so a metric
    reduced over ranks counts each scan once.

    Args:
        datalist: the full list, identical on every rank (e.g. ``@train_datalist``).
        even_divisible: pad to equal shards (training) or not (validation).
        name: the config id of ``datalist``, for the error message.
        rank, world_size: default to those of the initialised ``torch.distributed`` process
            group (0 and 1 without one, which returns the whole datalist).

    Raises:
        ValueError: ``datalist`` is empty or has fewer items than there are processes.
    """
    if rank is None or world_size is None:
        initialised = dist.is_available() and dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if initialised else (0, 1)
    if not datalist:
        raise ValueError(f"{name} is empty: there are no scans to share among {world_size} processes")
    if len(datalist) < world_size:
        raise ValueError(
            f"{name} holds {len(datalist)} scans for {world_size} processes, so some process would have none of "
            f"its own: give it at least {world_size} scans (for validation raise num_val) or start fewer processes"
        )
    if even_divisible:
        return shard_datalist(datalist, rank, world_size)
    return list(partition_dataset(list(datalist), num_partitions=world_size, even_divisible=False)[rank])
