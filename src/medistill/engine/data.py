"""Deterministic, resumable, distributed sampling for step-based training.

The sampler produces one global stream of sample keys ``(index, sample_seed)`` from the run's seed:
each epoch is a seeded permutation, cut into global batches; rank ``r`` of ``W`` takes the ``r``-th
slice of every global batch. Hence a run on W processes sees exactly the samples of a one-process run
with the same global batch, and resuming at step k needs no saved sampler state. Every sample carries
its own seed, so random augmentation is reproducible too (see :class:`KeyedDataset`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

SampleKey = tuple[int, int]


class GlobalBatchSampler(Sampler[list[SampleKey]]):
    """Yields this rank's share of each global batch, forever, starting at ``start_step``."""

    def __init__(
        self,
        n_samples: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        shuffle: bool = True,
    ) -> None:
        if n_samples <= 0:
            raise ValueError("the training set is empty")
        if global_batch % world_size:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {world_size} processes")
        self.n, self.batch, self.seed = n_samples, global_batch, seed
        self.rank, self.world, self.start_step, self.shuffle = rank, world_size, start_step, shuffle

    def _epoch(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def global_keys(self, step: int) -> list[SampleKey]:
        """The keys of global batch ``step`` (all ranks)."""
        first = step * self.batch
        keys: list[SampleKey] = []
        for pos in range(first, first + self.batch):
            epoch, offset = divmod(pos, self.n)
            keys.append((int(self._epoch(epoch)[offset]), int(pos)))
        return keys

    def __iter__(self) -> Iterator[list[SampleKey]]:
        per_rank = self.batch // self.world
        step = self.start_step
        while True:
            keys = self.global_keys(step)
            yield keys[self.rank * per_rank : (self.rank + 1) * per_rank]
            step += 1

    def __len__(self) -> int:  # effectively infinite; DataLoader only needs a number
        return 2**31 - 1


class KeyedDataset(Dataset):
    """A dataset whose items may be random but are fixed by their key.

    Subclasses implement :meth:`get` with a numpy Generator; ``dataset[i]`` (validation) uses a fixed
    generator, ``dataset[(i, sample_seed)]`` (training) one seeded by the run seed and the sample's
    position in the stream.
    """

    seed: int = 0

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, key: int | SampleKey) -> dict[str, torch.Tensor]:
        if isinstance(key, tuple):
            index, sample_seed = key
            return self.get(index, np.random.default_rng([self.seed, sample_seed]))
        return self.get(int(key), None)
