"""Metrics by subgroup (view, sex, age band): synthetic data with known group differences,
the demographics the cache records, and the evaluate report's table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import save_untrained_checkpoint
from pneumoloc.data.cache import open_cache, prepare_cache
from pneumoloc.data.demographics import age_band, dicom_demographics, sex_group, subgroup_columns
from pneumoloc.metrics.subgroups import MIN_BOOTSTRAP, bootstrap_ratio_ci, subgroup_metrics


@pytest.mark.parametrize(
    ("value", "band"),
    [
        ("051Y", "40-59"),
        ("51", "40-59"),
        ("017Y", "0-17"),
        ("018Y", "18-39"),
        ("006M", "0-17"),
        ("010W", "0-17"),
        ("080Y", "80+"),
        ("", "unknown"),
        (None, "unknown"),
        ("old", "unknown"),
        ("150", "unknown"),
    ],
)
def test_age_band(value: object, band: str) -> None:
    assert age_band(value) == band


def test_sex_group() -> None:
    assert [sex_group(v) for v in ("F", "m", " O ", "", None, "X")] == [
        "F",
        "M",
        "O",
        "unknown",
        "unknown",
        "unknown",
    ]


def _planted(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities and groups where the model is good on "AP", a coin flip on "PA"."""
    rng = np.random.default_rng(seed)
    groups = np.where(np.arange(n) % 3 == 0, "PA", "AP")
    y = rng.integers(0, 2, n)
    good = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.12, n), 0, 1)
    coin = rng.random(n)
    return y, np.where(groups == "AP", good, coin), groups


def test_known_subgroup_difference_is_found_with_separated_intervals() -> None:
    y, p, view = _planted()
    out = subgroup_metrics(y, p, {"view": view}, threshold=0.5, n_boot=300)
    assert out is not None
    ap, pa = (out["attributes"]["view"]["groups"][g] for g in ("AP", "PA"))
    assert ap["n"] + pa["n"] == len(y) and ap["n"] == 400
    assert ap["n_positive"] == int(y[view == "AP"].sum())
    assert ap["auroc"] > 0.95 and 0.35 < pa["auroc"] < 0.65
    assert ap["auroc_ci"][0] > pa["auroc_ci"][1]  # the intervals do not overlap
    assert ap["sensitivity"] > pa["sensitivity"] and ap["specificity"] > pa["specificity"]
    for m in (ap, pa):
        for key in ("auroc", "sensitivity", "specificity"):
            low, high = m[f"{key}_ci"]
            assert low <= m[key] <= high, key
    assert "rsna_map" not in ap  # no boxes given


def test_rsna_score_per_group() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0] * 2)
    p = np.where(y == 1, 0.9, 0.1)
    groups = np.array(["F"] * 6 + ["M"] * 6 + ["F"] * 6 + ["M"] * 6)
    truth = np.array([[10.0, 10.0, 40.0, 40.0]])
    far = np.array([[200.0, 200.0, 30.0, 30.0]])
    gts, boxes = [], []
    for yi, g in zip(y, groups, strict=True):
        gts.append(truth if yi else np.zeros((0, 4)))
        if not yi:
            boxes.append((np.zeros((0, 4)), np.zeros(0)))
        else:  # women's boxes are right, men's are elsewhere
            boxes.append((truth if g == "F" else far, np.array([0.8])))
    out = subgroup_metrics(y, p, {"sex": groups}, 0.5, boxes=boxes, gts=gts, n_boot=200)
    assert out is not None and out["rsna_scored"]
    f, m = out["attributes"]["sex"]["groups"]["F"], out["attributes"]["sex"]["groups"]["M"]
    assert f["rsna_map"] == pytest.approx(1.0) and m["rsna_map"] == pytest.approx(0.0)
    assert f["n_rsna_scored"] == 8  # negatives without boxes are not scored
    assert f["rsna_map_ci"] == pytest.approx([1.0, 1.0])


def test_unknown_last_all_unknown_dropped_small_groups_without_interval() -> None:
    y = np.array([0, 1] * 20)
    p = np.linspace(0, 1, 40)
    ages = np.array(["40-59"] * 30 + ["unknown"] * 6 + ["0-17"] * 4)
    out = subgroup_metrics(
        y, p, {"age_band": ages, "sex": np.array(["unknown"] * 40)}, 0.5, n_boot=50
    )
    assert out is not None and set(out["attributes"]) == {"age_band"}
    groups = out["attributes"]["age_band"]["groups"]
    assert list(groups) == ["0-17", "40-59", "unknown"]
    assert groups["0-17"]["n"] == 4 < MIN_BOOTSTRAP
    assert groups["0-17"]["auroc_ci"] == [None, None]
    assert groups["40-59"]["auroc_ci"][0] is not None
    assert subgroup_metrics(y, p, {"sex": np.array(["unknown"] * 40)}, 0.5) is None


def test_bootstrap_ratio_ci() -> None:
    hits = np.array([1.0] * 70 + [0.0] * 30)
    low, high = bootstrap_ratio_ci(hits, np.ones(100), n_boot=500)
    assert low is not None and high is not None and low < 0.7 < high and high - low < 0.25
    assert bootstrap_ratio_ci(np.zeros(5), np.zeros(5)) == (None, None)


# ---------------------------------------------------------------------------------------
# The cache records the groups; evaluate reports them
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_cache(synth_rsna: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("subgroup-cache") / "cache"
    prepare_cache(synth_rsna, out, size=32, workers=1, progress=False)
    return out


def test_cache_records_view_sex_and_age_band(synth_cache: Path) -> None:
    cache = open_cache(synth_cache)
    table = cache.table
    assert set(table["sex"]) <= {"F", "M"} and set(table["view"]) <= {"AP", "PA"}
    assert set(table["age_band"]) <= {"0-17", "18-39", "40-59", "60-79", "80+"}
    rows = np.arange(len(table))
    from_table = subgroup_columns(table, rows)
    # A cache made before these columns existed: read from the files' headers instead.
    from_files = subgroup_columns(table.drop(columns=["sex", "age_band"]), rows)
    for key in ("view", "sex", "age_band"):
        assert from_table[key].tolist() == from_files[key].tolist(), key
    first = dicom_demographics(table["path"].iloc[0])
    assert first == {"sex": table["sex"].iloc[0], "age_band": table["age_band"].iloc[0]}
    assert dicom_demographics(synth_cache / "manifest.json") == {
        "sex": "unknown",
        "age_band": "unknown",
    }


def test_evaluate_reports_subgroups(synth_cache: Path, tmp_path: Path) -> None:
    from pneumoloc.evaluate import evaluate

    ckpt = save_untrained_checkpoint(tmp_path / "m.pt", size=32, threshold=0.5)
    out = tmp_path / "eval"
    metrics = evaluate(
        ckpt, synth_cache, split="all", out=out, gallery=0, n_boot=50, progress=False
    )
    sub = metrics["subgroups"]
    assert set(sub["attributes"]) == {"view", "sex", "age_band"}
    n = metrics["classification"]["n"]
    for attribute in sub["attributes"].values():
        assert sum(g["n"] for g in attribute["groups"].values()) == n
        for g in attribute["groups"].values():
            assert {"auroc", "auroc_ci", "sensitivity", "specificity", "rsna_map"} <= set(g)
    assert json.loads((out / "metrics.json").read_text())["subgroups"] == sub
    html = (out / "report" / "index.html").read_text()
    assert "By subgroup: view position, sex, age band" in html and "subgroups.png" in html
    assert (out / "report" / "subgroups.png").stat().st_size > 1000
    # Aggregates only: no image id appears in the subgroup block.
    ids = set(open_cache(synth_cache).image_ids)
    assert not any(i in json.dumps(sub) for i in ids)


def test_prepare_fills_the_groups_of_an_older_cache(synth_rsna: Path, tmp_path: Path) -> None:
    """A cache whose index predates the sex and age band columns gets them on the next
    prepare, from the files' headers, without decoding any image again."""
    import pandas as pd

    out = tmp_path / "cache"
    prepare_cache(synth_rsna, out, size=32, workers=1, progress=False)
    index = pd.read_csv(out / "index.csv", keep_default_na=False)
    index.drop(columns=["sex", "age_band"]).to_csv(out / "index.csv", index=False)
    again = prepare_cache(synth_rsna, out, size=32, workers=1, progress=False)
    assert again.manifest["last_run"]["decoded"] == 0
    assert again.table["sex"].tolist() == index["sex"].tolist()
    assert again.table["age_band"].tolist() == index["age_band"].tolist()
