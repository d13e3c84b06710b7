"""Patient-level, label-stratified train/validation/test splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from pneumoloc.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Row indices of each part. No patient appears in two parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    fractions: tuple[float, float, float]

    def part(self, name: str) -> np.ndarray:
        """Indices of the named part ("train", "val", "test" or "all")."""
        if name == "all":
            return np.sort(np.concatenate([self.train, self.val, self.test]))
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; choose one of {[*SPLIT_NAMES, 'all']}")
        return getattr(self, name)

    def to_dict(self, image_ids: Sequence[str]) -> dict:
        """JSON-ready form, by image id so it survives a rebuilt cache."""
        return {
            "seed": self.seed,
            "fractions": list(self.fractions),
            **{name: [image_ids[i] for i in getattr(self, name)] for name in SPLIT_NAMES},
        }

    @classmethod
    def from_dict(cls, data: dict, image_ids: Sequence[str]) -> Split:
        """Inverse of :meth:`to_dict`; ids not in ``image_ids`` are ignored."""
        position = {image_id: i for i, image_id in enumerate(image_ids)}
        parts = {
            name: np.array(sorted(position[i] for i in data[name] if i in position), dtype=np.int64)
            for name in SPLIT_NAMES
        }
        return cls(seed=data["seed"], fractions=tuple(data["fractions"]), **parts)  # type: ignore[arg-type]


def patient_split(
    patient_ids: Sequence[str],
    labels: Sequence[int],
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> Split:
    """Split rows by patient, stratified on the patient's label (1 if any image is positive).

    Args:
        patient_ids: One per row.
        labels: One per row.
        fractions: Train, validation and test fractions of patients; they must sum to 1.
        seed: The split is a pure function of the inputs and this seed.

    Raises:
        DataError: On inconsistent lengths, bad fractions or too few patients.
    """
    if len(patient_ids) != len(labels):
        raise DataError("patient_ids and labels differ in length")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(
            f"split fractions must be three non-negative numbers summing to 1: {fractions}"
        )
    pids = np.asarray(patient_ids)
    y = np.asarray(labels, dtype=np.int64)
    unique, inverse = np.unique(pids, return_inverse=True)
    patient_label = np.zeros(len(unique), dtype=np.int64)
    np.maximum.at(patient_label, inverse, y)
    if len(unique) < 3:
        raise DataError(f"need at least 3 patients to split, got {len(unique)}")
    counts = np.bincount(patient_label, minlength=2)
    stratify = patient_label if counts.min() >= 3 else None
    try:
        return _split(inverse, patient_label, stratify, fractions, seed)
    except ValueError as exc:  # scikit-learn's message for parts that would be empty
        raise DataError(f"cannot split {len(unique)} patients into {fractions}: {exc}") from None


def _split(
    inverse: np.ndarray,
    patient_label: np.ndarray,
    stratify: np.ndarray | None,
    fractions: tuple[float, float, float],
    seed: int,
) -> Split:
    order = np.arange(len(patient_label))
    _, f_val, f_test = fractions
    rest_size = f_val + f_test
    if rest_size == 0:
        train_p, val_p, test_p = order, order[:0], order[:0]
    else:
        train_p, rest = train_test_split(
            order, test_size=rest_size, random_state=seed, stratify=stratify
        )
        rest_strat = patient_label[rest] if stratify is not None else None
        if rest_strat is not None and np.bincount(rest_strat, minlength=2).min() < 2:
            rest_strat = None
        if f_test == 0:
            val_p, test_p = rest, rest[:0]
        elif f_val == 0:
            val_p, test_p = rest[:0], rest
        else:
            val_p, test_p = train_test_split(
                rest, test_size=f_test / rest_size, random_state=seed, stratify=rest_strat
            )
    parts = []
    for chosen in (train_p, val_p, test_p):
        mask = np.isin(inverse, chosen)
        parts.append(np.flatnonzero(mask).astype(np.int64))
    return Split(train=parts[0], val=parts[1], test=parts[2], seed=seed, fractions=tuple(fractions))  # type: ignore[arg-type]
