"""Drawing training batches from several sources so that none swamps the others.

Training on the RSNA sample (445 training images) and Kermany's pediatric films (3,640) with a
plain shuffle would show the model eight Kermany films for every RSNA one. The
:class:`SourceBalancedSampler` instead fixes each source's share of an epoch (equal shares by
default): every epoch draws ``k_s`` positions of source ``s`` (without replacement when the
source has that many, so a large source shows a fresh random subset each epoch; a small one is
repeated only when its share exceeds its size). The draw is a pure function of the seed and the
epoch, and is sharded across DDP ranks like ``DistributedSampler``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from pneumoloc.data.datasets import SourcesDataset
from pneumoloc.errors import ConfigError

__all__ = ["SourceBalancedSampler", "allocate"]


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` items into integer shares proportional to ``weights`` (largest remainder).

    Raises:
        ConfigError: A weight is negative or all are zero.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"source weights must be non-negative and not all zero, got {weights}")
    exact = total * w / w.sum()
    shares = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - shares), kind="stable")[: total - int(shares.sum())]:
        shares[i] += 1
    return shares.tolist()


class SourceBalancedSampler(Sampler[int]):
    """Positions of a :class:`SourcesDataset` with a fixed share of every epoch per source.

    Args:
        dataset: The sources.
        weights: Relative share of an epoch per source (default: equal).
        num_samples: Items per epoch over all ranks (default: the number of sources times the
            size of the smallest one, so the smallest source is seen once per epoch).
        num_replicas: DDP world size.
        rank: This process's rank.
        seed: Seed of the draws (with the epoch).
    """

    def __init__(
        self,
        dataset: SourcesDataset,
        weights: Sequence[float] | None = None,
        *,
        num_samples: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        sizes = list(dataset.sizes().values())
        if min(sizes) == 0:
            empty = [n for n, k in dataset.sizes().items() if k == 0]
            raise ConfigError(f"training sources without images: {empty}")
        weights = list(weights) if weights is not None else [1.0] * len(sizes)
        if len(weights) != len(sizes):
            raise ConfigError(
                f"{len(weights)} source weights for {len(sizes)} sources ({dataset.names})"
            )
        total = num_samples or len(sizes) * min(sizes)
        self.shares = allocate(total, weights)
        self.dataset = dataset
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.per_rank = -(-total // num_replicas)  # padded like DistributedSampler

    def set_epoch(self, epoch: int) -> None:
        """Draw the positions of ``epoch`` next."""
        self.epoch = epoch

    def epoch_positions(self) -> np.ndarray:
        """All ranks' positions of the current epoch, before sharding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        picks = []
        for s, (k, size) in enumerate(zip(self.shares, self.dataset.sizes().values(), strict=True)):
            rounds, rest = divmod(k, size)
            chosen = [rng.permutation(size) for _ in range(rounds)]
            chosen.append(rng.choice(size, size=rest, replace=False))
            picks.append(self.dataset.offsets[s] + np.concatenate(chosen).astype(np.int64))
        positions = rng.permutation(np.concatenate(picks))
        pad = self.per_rank * self.num_replicas - len(positions)
        return np.concatenate([positions, positions[:pad]]) if pad > 0 else positions

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_positions()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.per_rank
