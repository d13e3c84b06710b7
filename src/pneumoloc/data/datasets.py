"""Torch datasets over a cache.

Weak supervision is the point of pneumoloc: no ground-truth box may reach training. This is
structural, not a convention: :class:`ImageLabelDataset` is built from an image array and a label
array only. It never receives the cache object, its table or its folder, so it has no way to
reach ``boxes.json``; ``__getitem__`` returns ``(image, label)`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pneumoloc.errors import DataError


class ImageLabelDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(image, label) pairs for training and validation.

    Args:
        images: uint8 array (N, H, W), typically the cache's memory map.
        labels: int array (N,) of image-level labels.
        indices: The rows this dataset exposes.

    Items are ``(uint8 tensor (1, H, W), float32 scalar label)``; intensity scaling and
    augmentation happen batched on the training device (see ``pneumoloc.training.augment``).
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, indices: Sequence[int] | np.ndarray
    ) -> None:
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"images must be a uint8 (N, H, W) array, got {images.dtype} {images.shape}"
            )
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise DataError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        self._images = images
        self._labels = labels.astype(np.float32)
        self._indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self._indices[i]
        image = torch.from_numpy(np.array(self._images[row], copy=True)).unsqueeze(0)
        return image, torch.tensor(self._labels[row])

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batched fetch: one sorted gather from the memory map instead of many small reads."""
        images, labels = self.gather(np.asarray(items, dtype=np.int64))
        return [(images[k], labels[k]) for k in range(len(items))]

    @property
    def labels(self) -> np.ndarray:
        """Labels of the exposed rows, float32."""
        return self._labels[self._indices]

    @property
    def images(self) -> np.ndarray:
        """The whole image array this dataset reads from (all N rows, not only the exposed ones),
        as a read-only view: uint8 (N, H, W)."""
        view = self._images.view()
        view.flags.writeable = False
        return view

    @property
    def indices(self) -> np.ndarray:
        """The rows of :attr:`images` this dataset exposes, in order, as a read-only int64 view.

        ``ImageLabelDataset(d.images, labels, d.indices[positions])`` is a subset of ``d``.
        """
        view = self._indices.view()
        view.flags.writeable = False
        return view

    def gather(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: uint8 (B, 1, H, W) and float32 (B,)."""
        rows = self._indices[positions]
        order = np.argsort(rows, kind="stable")
        gathered = np.empty((len(rows), *self._images.shape[1:]), dtype=np.uint8)
        gathered[order] = self._images[rows[order]]
        return torch.from_numpy(gathered).unsqueeze(1), torch.from_numpy(self._labels[rows])


def training_dataset(cache, part: str) -> ImageLabelDataset:  # type: ignore[no-untyped-def]
    """The (image, label) dataset of one split part of a cache.

    Hands over the images and labels only, never the cache itself.
    """
    return ImageLabelDataset(cache.images, cache.labels, cache.split.part(part))


class SourcesDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Several :class:`ImageLabelDataset` one after the other, each a named source.

    Position ``i`` of this dataset is position ``i - offset[s]`` of source ``s``. Like its parts
    it holds images and labels only (no cache, no boxes).

    Args:
        sources: Name -> dataset, in order; every dataset's images have the same (H, W).
    """

    def __init__(self, sources: dict[str, ImageLabelDataset]) -> None:
        if not sources:
            raise DataError("no training sources")
        shapes = {tuple(d.images.shape[1:]) for d in sources.values()}
        if len(shapes) != 1:
            raise DataError(f"sources have images of different sizes: {sorted(shapes)}")
        self.names = list(sources)
        self.parts = list(sources.values())
        sizes = np.array([len(d) for d in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.source_of = np.repeat(np.arange(len(self.parts)), sizes)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.source_of[i])
        return self.parts[s][int(i - self.offsets[s])]

    @property
    def labels(self) -> np.ndarray:
        """Labels of every position, float32."""
        return np.concatenate([d.labels for d in self.parts]).astype(np.float32)

    def sizes(self) -> dict[str, int]:
        """Items per source."""
        return {n: len(d) for n, d in zip(self.names, self.parts, strict=True)}

    def gather(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch at once: uint8 (B, 1, H, W) and float32 (B,), in ``positions`` order."""
        positions = np.asarray(positions, dtype=np.int64)
        h, w = self.parts[0].images.shape[1:]
        images = torch.empty((len(positions), 1, h, w), dtype=torch.uint8)
        labels = torch.empty(len(positions), dtype=torch.float32)
        sources = self.source_of[positions]
        for s, part in enumerate(self.parts):
            where = np.flatnonzero(sources == s)
            if len(where):
                im, lab = part.gather(positions[where] - self.offsets[s])
                images[where], labels[where] = im, lab
        return images, labels
