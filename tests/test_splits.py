"""Patient-level, stratified splits."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import KERMANY
from pneumoloc.data.folder import index_folder, patient_from_filename
from pneumoloc.data.splits import Split, patient_split
from pneumoloc.errors import DataError


def _toy(n_patients: int = 60, seed: int = 0) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    pids, labels = [], []
    for p in range(n_patients):
        lab = int(p % 4 == 0)
        for _ in range(rng.integers(1, 4)):
            pids.append(f"p{p}")
            labels.append(lab)
    return pids, labels


def test_no_patient_in_two_parts_and_all_rows_used() -> None:
    pids, labels = _toy()
    split = patient_split(pids, labels, seed=1)
    parts = [set(np.asarray(pids)[split.part(k)]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sorted(split.part("all").tolist()) == list(range(len(pids)))


def test_stratified_and_deterministic() -> None:
    pids, labels = _toy(200)
    a = patient_split(pids, labels, seed=5)
    b = patient_split(pids, labels, seed=5)
    c = patient_split(pids, labels, seed=6)
    assert all(np.array_equal(a.part(k), b.part(k)) for k in ("train", "val", "test"))
    assert not np.array_equal(a.train, c.train)
    y = np.asarray(labels)
    for part in ("train", "val", "test"):
        assert abs(y[a.part(part)].mean() - y.mean()) < 0.08


def test_roundtrip_by_id() -> None:
    pids, labels = _toy()
    split = patient_split(pids, labels, seed=2)
    ids = [f"img{i}" for i in range(len(pids))]
    again = Split.from_dict(split.to_dict(ids), ids)
    assert np.array_equal(again.val, split.val) and np.array_equal(again.test, split.test)


def test_bad_fractions() -> None:
    with pytest.raises(DataError, match="sum"):
        patient_split(["a", "b", "c"], [0, 1, 0], fractions=(0.5, 0.5, 0.5))


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person12_virus_44.jpeg", "person12"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
        ("other.png", "other"),
    ],
)
def test_kermany_patient_ids(name: str, patient: str) -> None:
    assert patient_from_filename(name) == patient


@pytest.mark.skipif(not KERMANY.is_dir(), reason="shared Kermany set not present")
def test_kermany_split_is_by_patient() -> None:
    index = index_folder(KERMANY)
    assert len(index.records) == 5216
    pids = [r.patient_id for r in index.records]
    split = patient_split(pids, [r.label for r in index.records], seed=0)
    train = {pids[i] for i in split.train}
    test = {pids[i] for i in split.test}
    assert not train & test
