"""Standard normal noise for the corruptions, drawn on all CPU cores.

torch's CPU generator is one Mersenne twister that fills a tensor serially: the few million
normals of a batch of 3D volumes (Frepa's image masking and spectral noise) took 43-49 ms on one
core while every other op of the corruption ran on all of them (bench/bench_ops.py). Here a
large CPU tensor is cut into fixed chunks, each filled by its own twister seeded from the
caller's generator, on a thread pool (torch's kernels release the GIL). GPU generators are
parallel already and are used as they are.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

__all__ = ["CHUNK_NUMEL", "standard_normal", "standard_normal_"]

# Elements per independently seeded chunk (1 MiB of float32). The values depend on it, never on
# the number of threads, so a seed gives the same noise on every machine.
CHUNK_NUMEL = 1 << 18


@functools.lru_cache(maxsize=None)
def _thread_pool(process_id: int, workers: int) -> ThreadPoolExecutor:
    """One pool per process and thread count: a forked DataLoader worker must not use its parent's threads."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medssl-noise")


@torch.compiler.disable  # a thread pool is no graph: torch.compile calls this eagerly
def standard_normal_(out: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill the real, contiguous tensor ``out`` with N(0, 1) samples reproducible from ``generator``; returns ``out``.

    On the CPU a tensor of more than :data:`CHUNK_NUMEL` elements takes one draw from
    ``generator`` per chunk of :data:`CHUNK_NUMEL` elements (the chunk's seed, uniform over the
    twister's 32-bit seeds); the chunks are filled on ``torch.get_num_threads()`` threads.
    Smaller tensors, and tensors on other devices, are ``out.normal_(generator=generator)``, the
    values ``torch.randn`` draws.
    """
    if out.device.type != "cpu" or out.numel() <= CHUNK_NUMEL:
        return out.normal_(generator=generator)
    chunks = out.view(-1).split(CHUNK_NUMEL)
    seeds = torch.randint(0, 2**32, (len(chunks),), generator=generator).tolist()

    def fill(chunk: torch.Tensor, seed: int) -> None:
        chunk.normal_(generator=torch.Generator().manual_seed(seed))

    pool = _thread_pool(os.getpid(), torch.get_num_threads())
    for done in [pool.submit(fill, chunk, seed) for chunk, seed in zip(chunks, seeds)]:
        done.result()  # re-raises a chunk's error here
    return out


def standard_normal(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A new tensor of :func:`standard_normal_` samples, shaped ``shape``, of the real ``dtype``."""
    return standard_normal_(torch.empty(tuple(shape), dtype=dtype, device=device), generator)
