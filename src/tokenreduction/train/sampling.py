"""Data order and augmentation randomness as functions of (seed, epoch, index),
so a resumed run sees exactly the batches an uninterrupted one would."""
from __future__ import annotations

import math
import random
import signal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

#: signals the trainer turns into "checkpoint, then exit" (see runtime.SignalFlag)
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler[int]):
    """Indices of one rank for one epoch, a function of (seed, epoch) only.

    Shuffled by a generator seeded per epoch; padded to a multiple of the
    world size and strided by rank like DistributedSampler; ``start`` skips
    the first indices (mid-epoch resume)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.world_size > 1:
            total = math.ceil(self.num_samples / self.world_size) * self.world_size
            order = (order + order[: total - len(order)])[self.rank :: self.world_size]
        return order

    def __iter__(self):
        return iter(self.rank_indices()[self.start :])

    def __len__(self) -> int:
        return len(self.rank_indices()) - self.start


class SeededSamples(Dataset):
    """Wraps a dataset so each item's random transforms draw from RNGs seeded
    by (seed, epoch, index), leaving the caller's RNG states untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        s = mix_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % (2**32))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def worker_init(_worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1: the main process handles
    them and saves, and the workers must not die first."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
