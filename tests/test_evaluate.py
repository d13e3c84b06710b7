"""``evaluate``: metrics agree with the one inference path, the report is complete and safe."""

from __future__ import annotations

import csv
import json
import re
import shutil
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from conftest import write_folder_dataset
from pneumoloc import DISCLAIMER
from pneumoloc.cli import main
from pneumoloc.data.cache import open_cache, prepare_cache
from pneumoloc.errors import ConfigError
from pneumoloc.evaluate import TUNING_GRID, EvalPredictions, evaluate, tune_box_config
from pneumoloc.inference import Predictor
from pneumoloc.localise.boxes import BoxConfig, ScoredBoxes
from pneumoloc.metrics import rsna_map
from pneumoloc.train import train
from pneumoloc.training.config import load_train_config

SIZE = 32


@pytest.fixture(scope="module")
def trained(synth_rsna: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache folder, checkpoint) of smallcamnet trained 2 epochs at 32 px on the synthetic set."""
    root = tmp_path_factory.mktemp("eval-model")
    cache = root / "cache"
    prepare_cache(synth_rsna, cache, size=SIZE, workers=1, progress=False)
    config = load_train_config(
        None,
        dict(
            data=str(cache),
            out=str(root / "run"),
            model="smallcamnet",
            image_size=SIZE,
            epochs=2,
            batch_size=8,
            lr=3e-3,
            seed=0,
            device="cpu",
            progress=False,
        ),
    )
    return cache, train(config).best_checkpoint


def _png_links(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_evaluate_rsna_writes_metrics_and_report(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    cache_dir, ckpt = trained
    out = tmp_path / "eval"
    metrics = evaluate(ckpt, cache_dir, split="all", out=out, gallery=2, n_boot=100, progress=False)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    c, loc, prov = metrics["classification"], metrics["localisation"], metrics["provenance"]
    for key in (
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "auprc",
        "sensitivity",
        "specificity",
        "ece",
        "brier",
        "threshold",
        "confusion",
        "curves",
        "calibration",
    ):
        assert key in c, key
    for key in (
        "rsna_map",
        "notebook_mean_iou",
        "pointing_game",
        "max_box_acc",
        "max_box_acc_curve",
    ):
        assert key in loc, key
    assert {"iou_0.3", "iou_0.5"} <= set(loc["max_box_acc"])
    assert len(loc["max_box_acc_curve"]["iou_0.3"]) == len(
        loc["max_box_acc_curve"]["cam_thresholds"]
    )
    for key in (
        "data_source",
        "cache_fingerprint",
        "split",
        "checkpoint",
        "model_id",
        "cam_method",
        "box_config",
        "boxes_tuned_on_val",
        "pneumoloc_version",
        "limits",
    ):
        assert key in prov, key
    assert prov["disclaimer"] == DISCLAIMER and prov["boxes_tuned_on_val"] is False
    assert prov["box_source"] == "cam"  # what draws the boxes (a detector says "detector")
    assert prov["split"] == {
        "name": "all",
        "n_images": 40,
        "seed": 0,
        "fractions": [0.7, 0.15, 0.15],
    }
    assert "optimistic" in prov["limits"]  # "all" includes the training images

    # The numbers are those of the one inference path on the same cache rows.
    cache = open_cache(cache_dir)
    rows = cache.split.part("all")
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    preds = predictor.predict_arrays(np.asarray(cache.images[rows]), cache.original_shapes[rows])
    probs = np.array([p.probability for p in preds])
    assert c["auroc"] == pytest.approx(roc_auc_score(cache.labels[rows], probs), abs=1e-9)
    gts = cache.load_eval_boxes(rows, scale="original")
    expected = rsna_map([(p.boxes.boxes, p.boxes.scores) for p in preds], gts)
    assert loc["rsna_map"] == pytest.approx(expected, abs=1e-9)

    # Within-view metrics: the synthetic DICOMs carry ViewPosition AP or PA.
    labels = cache.labels[rows]
    views = cache.table["view"].to_numpy()[rows]
    by_view = c["by_view"]
    assert set(by_view["views"]) == {"AP", "PA"} == set(views)
    for view, m in by_view["views"].items():
        mask = views == view
        assert (m["n"], m["n_positive"]) == (int(mask.sum()), int(labels[mask].sum()))
        expected_auroc = roc_auc_score(labels[mask], probs[mask])
        assert m["auroc"] == pytest.approx(expected_auroc, abs=1e-9)
        assert m["auroc_ci_low"] is not None
    assert sum(m["n"] for m in by_view["views"].values()) == c["n"] == 40
    is_ap = (views == "AP").astype(int)
    assert by_view["view_only_auroc"] == pytest.approx(roc_auc_score(labels, is_ap), abs=1e-9)
    assert by_view["view_predictability_auroc"] == pytest.approx(
        roc_auc_score(is_ap, probs), abs=1e-9
    )
    assert c["patient_level"] is None  # RSNA: one image per patient

    html = (out / "report" / "index.html").read_text()
    links = _png_links(html)
    assert {"roc.png", "pr.png", "calibration.png", "box_sweep.png"} <= set(links)
    gallery = [link for link in links if re.match(r"(tp|fp|fn)_\d\d_", link)]
    assert 1 <= len(gallery) <= 6
    assert all((out / "report" / link).is_file() for link in links)
    assert DISCLAIMER in html and html_escape(prov["limits"]) in html
    # The anatomy baselines sit beside the model in the report, with the numbers of the JSON.
    assert "Against anatomy (same films)" in html
    lungs = loc["vs_anatomy"]["lung_fields"]["rsna_map_label_gated"]
    row = re.search(r"<th>Lung fields \(one box[^<]*</th>((?:<td class='num'>[^<]*</td>)+)", html)
    assert row is not None
    assert re.findall(r"<td class='num'>([^<]*)</td>", row.group(1))[1] == f"{lungs:.3f}"


def test_evaluate_folder_dataset_has_no_localisation(
    trained: tuple[Path, Path], folder_dataset: Path, tmp_path: Path
) -> None:
    _, ckpt = trained
    out = tmp_path / "eval"
    metrics = evaluate(
        ckpt, folder_dataset, split="all", out=out, n_boot=50, workers=1, progress=False
    )
    assert metrics["localisation"] is None
    c = metrics["classification"]
    assert c["n"] == 12
    assert metrics["provenance"]["data_kind"] == "folder"
    # PNG/JPEG carry no view; two images per patient are aggregated by their mean probability.
    assert c["by_view"] is None
    patient = c["patient_level"]
    assert patient["aggregate"] == "mean" and patient["label_rule"] == "max"
    assert (patient["n_patients"], patient["n_images"], patient["n_positive"]) == (6, 12, 3)
    assert patient["n_multi_image_patients"] == 6
    cache = open_cache(Path(metrics["provenance"]["cache_path"]))
    table = cache.table.iloc[cache.split.part("all")]
    labels = table.groupby("patient_id")["label"].max()
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    rows = cache.split.part("all")
    preds = predictor.predict_arrays(np.asarray(cache.images[rows]), cache.original_shapes[rows])
    probs = table.assign(p=[p.probability for p in preds]).groupby("patient_id")["p"].mean()
    assert patient["auroc"] == pytest.approx(roc_auc_score(labels, probs[labels.index]), abs=1e-9)
    html = (out / "report" / "index.html").read_text()
    assert "Ground-truth boxes are unavailable" in html
    assert "Patients (mean probability)" in html and "6 patients" in html
    assert "box_sweep.png" not in html and not (out / "report" / "box_sweep.png").exists()
    assert all((out / "report" / link).is_file() for link in _png_links(html))


def test_tune_boxes_on_val_records_config_and_refuses_val(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    cache_dir, ckpt = trained
    for split in ("val", "all"):
        with pytest.raises(ConfigError, match="validation"):
            evaluate(ckpt, cache_dir, split=split, out=tmp_path / split, tune_boxes_on_val=True)
    assert not (tmp_path / "val").exists()
    metrics = evaluate(
        ckpt,
        cache_dir,
        split="test",
        out=tmp_path / "t",
        tune_boxes_on_val=True,
        n_boot=0,
        gallery=0,
        progress=False,
    )
    prov, tuning = metrics["provenance"], metrics["box_tuning"]
    assert prov["boxes_tuned_on_val"] is True
    assert tuning["split"] == "val" and tuning["n_images"] == len(open_cache(cache_dir).split.val)
    assert prov["box_config"] == tuning["chosen"]
    assert tuning["chosen"]["rule"] in TUNING_GRID["rule"]
    assert tuning["chosen"]["max_boxes"] in TUNING_GRID["max_boxes"]
    assert len(tuning["grid"]) == 5 * 3 + 3
    best = max(-1.0 if g["rsna_map"] is None else g["rsna_map"] for g in tuning["grid"])
    chosen = [
        g
        for g in tuning["grid"]
        if g["rule"] == tuning["chosen"]["rule"]
        and g["max_boxes"] == tuning["chosen"]["max_boxes"]
        and g["peak_fraction"] == tuning["chosen"]["peak_fraction"]
    ]
    assert (-1.0 if chosen[0]["rsna_map"] is None else chosen[0]["rsna_map"]) == best
    assert "yes: chosen" in (tmp_path / "t" / "report" / "index.html").read_text()


def test_tune_box_config_finds_the_known_best() -> None:
    # Core of value 1 (the true box) inside a halo of 0.45: peak fractions <= 0.4 and Otsu... the
    # halo joins the box at low fractions, so only fractions >= 0.5 reproduce the truth exactly.
    heat = np.zeros((32, 32), np.float32)
    heat[4:28, 4:28] = 0.45
    heat[10:20, 12:22] = 1.0
    truth = np.array([[12, 10, 10, 10]], np.float32)
    preds = EvalPredictions(
        rows=np.arange(2),
        labels=np.array([1, 0]),
        probs=np.array([0.9, 0.1]),
        boxes=[ScoredBoxes(), ScoredBoxes()],
        heatmaps=[heat, None],
        gts=[truth, np.zeros((0, 4), np.float32)],
        shapes=np.array([[32, 32]] * 2),
    )
    chosen, grid = tune_box_config(preds, 0.5, BoxConfig(closing=0))
    assert chosen.rule == "peak" and chosen.peak_fraction == 0.5 and chosen.max_boxes == 1
    assert chosen.closing == 0  # untuned fields come from the base
    scores = {(g["rule"], g["peak_fraction"], g["max_boxes"]): g["rsna_map"] for g in grid}
    assert scores[("peak", 0.5, 1)] == 1.0
    assert scores[("peak", 0.3, 1)] == 0.0


def _hostile_rsna(src: Path, dst: Path) -> list[str]:
    """A copy of an RSNA-layout folder whose patientIds are path tricks, spaces and unicode."""
    shutil.copytree(src, dst)
    images = dst / "stage_2_train_images"
    mapping: dict[str, str] = {}
    for i, path in enumerate(sorted(images.glob("*.dcm"))):
        new = ["..%2f..%2fx", "a b", "é ü", "..", "<b>"][i % 5] + f"{i}"
        mapping[path.stem] = new
        path.rename(images / f"{new}.dcm")
    for name in ("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv"):
        with (dst / name).open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        for row in rows[1:]:
            row[0] = mapping[row[0]]
        with (dst / name).open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows(rows)
    return list(mapping.values())


def test_hostile_image_ids_cannot_escape_the_report(
    trained: tuple[Path, Path], synth_rsna: Path, tmp_path: Path
) -> None:
    _, ckpt = trained
    data = tmp_path / "data"
    _hostile_rsna(synth_rsna, data)
    out = tmp_path / "work" / "eval"
    before = {p for p in tmp_path.rglob("*")}
    evaluate(ckpt, data, split="all", out=out, gallery=40, n_boot=0, workers=1, progress=False)
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(out in p.parents or p == out or p in out.parents for p in created)
    report = out / "report"
    gallery = [p for p in report.iterdir() if re.match(r"(tp|fp|fn)_", p.name)]
    assert len(gallery) >= 5
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.png", p.name) for p in gallery)
    html = (report / "index.html").read_text()
    assert "<b>" not in html and "&lt;b&gt;" in html


def test_hostile_folder_file_names(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, ckpt = trained
    data = write_folder_dataset(tmp_path / "data", n_per_class=4, size=40)
    for path in sorted((data / "PNEUMONIA").iterdir()) + sorted((data / "NORMAL").iterdir()):
        # (not starting with a dot: hidden files are left out, by prepare and predict alike)
        path.rename(path.with_name(f"x..%2f..%2f {path.stem} é{path.suffix}"))
    out = tmp_path / "eval"
    evaluate(ckpt, data, split="all", out=out, gallery=10, n_boot=0, workers=1, progress=False)
    names = [p.name for p in (out / "report").iterdir()]
    assert any(n.startswith(("tp_", "fp_", "fn_")) for n in names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.(png|html)", n) for n in names), names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "eval"]


def test_cli_evaluate(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_dir, ckpt = trained
    out = tmp_path / "cli"
    code = main(
        [
            "evaluate",
            str(ckpt),
            "--data",
            str(cache_dir),
            "--split",
            "test",
            "--out",
            str(out),
            "--box-rule",
            "otsu",
            "--gallery",
            "1",
            "--n-boot",
            "20",
            "--image-size",
            "auto",
            "--quiet",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["provenance"]["box_config"]["rule"] == "otsu"
    assert metrics["provenance"]["split"]["name"] == "test"
    printed = capsys.readouterr().out
    assert "report:" in printed
    assert f"ECE {metrics['classification']['ece']:.4f}" in printed
    for view, m in metrics["classification"]["by_view"]["views"].items():
        assert f"{view} " in printed and f"({m['n']} images, {m['n_positive']} positive)" in printed
    lungs = metrics["localisation"]["vs_anatomy"]["lung_fields"]
    assert f"(lung-field boxes {lungs['rsna_map_label_gated']:.3f})" in printed
    assert f"(random point of the lung {lungs['pointing_game']:.3f})" in printed
    assert (
        main(
            [
                "evaluate",
                str(ckpt),
                "--data",
                str(cache_dir),
                "--split",
                "val",
                "--tune-boxes-on-val",
                "--out",
                str(tmp_path / "no"),
                "--quiet",
            ]
        )
        == 2
    )


def test_cli_evaluate_localisation_options(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """--refine, --cam-layers and --box-gate reach the predictor and are recorded."""
    cache_dir, ckpt = trained
    out = tmp_path / "opts"
    argv = ["evaluate", str(ckpt), "--data", str(cache_dir), "--out", str(out), "--quiet"]
    argv += ["--refine", "randomwalk", "--cam", "layercam", "--cam-layers", "stages"]
    argv += ["--box-gate", "f1", "--gallery", "0", "--n-boot", "10"]
    assert main(argv) == 0
    prov = json.loads((out / "metrics.json").read_text())["provenance"]
    assert prov["refine"] == "randomwalk" and prov["cam_layers"] == "stages"
    assert prov["box_gate"] == "f1" and prov["box_threshold"] >= prov["threshold"]


def test_evaluate_runs_the_onnx_twin_with_the_same_results(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    """With an ONNX twin of the checkpoint, evaluate runs its network with ONNX Runtime and
    reports the same numbers (float32 rounding apart) and the same provenance but the backend;
    a twin of other weights is not used."""
    from pneumoloc.export import export_onnx

    cache, best = trained
    ckpt = tmp_path / "model.pt"
    shutil.copy(best, ckpt)
    before = evaluate(ckpt, cache, out=tmp_path / "torch", progress=False)
    export_onnx(ckpt, tmp_path / "model.onnx")
    after = evaluate(ckpt, cache, out=tmp_path / "onnx", progress=False)
    assert (before["provenance"]["backend"], after["provenance"]["backend"]) == ("torch", "onnx")
    c0, c1 = before["classification"], after["classification"]
    assert c1["auroc"] == pytest.approx(c0["auroc"], abs=1e-9)
    assert c1["n"] == c0["n"] and c1["brier"] == pytest.approx(c0["brier"], abs=1e-6)
    l0, l1 = before["localisation"], after["localisation"]
    assert l1["rsna_map"] == pytest.approx(l0["rsna_map"], abs=1e-6)
    _assert_close(l1["vs_anatomy"], l0["vs_anatomy"])  # anatomy baselines, label-gated
    for key in ("model_id", "threshold", "checkpoint_pneumoloc_version", "split"):
        assert after["provenance"][key] == before["provenance"][key]


def _assert_close(a: object, b: object, tol: float = 1e-6) -> None:
    """Equal structure; numbers within ``tol``; everything else equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key], tol)
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_close(x, y, tol)
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, abs=tol, nan_ok=True)
    else:
        assert a == b
