"""Which training samples each rank sees, and the seed each sample's augmentation runs with.

Every seed derives from (train.seed, epoch, sample index) alone, so a sample's augmentation depends
neither on ``data.num_workers`` nor on the world size nor on which process loads it, and a resumed epoch
replays exactly what the uninterrupted run did.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from components.config import Config
from components.data.dataset import CityscapesSegmentation, worker_init_fn


def derived_seed(*entropy: int) -> int:
    """A well-mixed 32-bit seed from a tuple of integers (e.g. seed, epoch, index)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def train_loader(
    cfg: Config,
    train_set: CityscapesSegmentation,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """This rank's shuffled, augmented batches; ``loader.sampler.set_epoch(epoch)`` before each epoch."""
    sampler = _SeededSampler(
        DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.train.seed, drop_last=True
        ),
        cfg.train.seed,
    )
    workers = cfg.data.num_workers
    return DataLoader(
        _SeededSamples(train_set),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        # Workers live for the whole run instead of being re-spawned every epoch; seeded per sample,
        # they need no reseeding.
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=worker_init_fn,
        # Starting the workers draws their base seed from this generator. Without one it would come
        # from the global torch RNG, and only in a process's first epoch (workers persist): a resumed
        # run would shift the global RNG at another epoch than the uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )


class _SeededSampler(Sampler):
    """Yields ``(index, seed)``: each sample's augmentation seed derives from (seed, epoch, index).

    The seed travels with the index to whichever (persistent) worker loads the sample.
    """

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.sampler:
            yield index, derived_seed(self.seed, self.epoch, index)


class _SeededSamples(Dataset):
    """The training set indexed by ``(index, seed)``: seeds the augmentation pipeline, then loads."""

    def __init__(self, dataset: CityscapesSegmentation) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        self.dataset.transform.set_random_seed(seed)
        return self.dataset[index]
