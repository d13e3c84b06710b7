"""The input check (issue 14): blank, noise, photographs, turned films and non-chest DICOM tags
are refused with a reason and no probability; real frontal films pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import KERMANY, RSNA_SAMPLE, save_untrained_checkpoint, write_folder_dataset
from pneumoloc.calibrate_ood import calibrate_ood
from pneumoloc.data.cache import prepare_cache
from pneumoloc.inference import Predictor
from pneumoloc.inference.input_check import InputCheck, check_dicom_tags, default_layout_model
from pneumoloc.inference.ood import OodModel, fit_ood_model, load_ood_model, ood_path
from pneumoloc.io import read_xray
from pneumoloc.io.preprocess import resize_square
from pneumoloc.predict import predict_paths

RSNA_FILES = sorted((RSNA_SAMPLE / "stage_2_train_images").glob("*.dcm"))[:6]
KERMANY_FILES = (
    sorted((KERMANY / "NORMAL").glob("*.jpeg"))[:3]
    + sorted((KERMANY / "PNEUMONIA").glob("*.jpeg"))[:3]
)
needs_real = pytest.mark.skipif(not RSNA_FILES or not KERMANY_FILES, reason="needs ../shared/data")


def _film(path: Path, size: int = 192) -> np.ndarray:
    return resize_square(read_xray(path).pixels, size)


def _check() -> InputCheck:
    return InputCheck(layout=default_layout_model())


def test_the_layout_model_ships() -> None:
    assert default_layout_model() is not None


@needs_real
def test_real_frontal_films_pass() -> None:
    check = _check()
    for path in RSNA_FILES + KERMANY_FILES:
        result = check.check(_film(path), tags={"Modality": "CR", "ViewPosition": "PA"})
        assert result.accepted, (path.name, result.reasons, result.evidence)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("black", "blank"),
        ("white", "blank"),
        ("grey", "blank"),
        ("noise", "noise"),
        ("gradient", "no fine structure"),
        ("binary", "grey levels"),
    ],
)
def test_blank_noise_gradient_and_binary_images_are_refused(kind: str, reason: str) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:192, 0:192]
    images = {
        "black": np.zeros((192, 192), np.uint8),
        "white": np.full((192, 192), 255, np.uint8),
        "grey": np.full((192, 192), 128, np.uint8),
        "noise": rng.integers(0, 256, (192, 192)).astype(np.uint8),
        "gradient": (xx * 255 / 191).astype(np.uint8),
        "binary": ((xx // 24 + yy // 24) % 2 * 255).astype(np.uint8),
    }
    result = _check().check(images[kind])
    assert not result.accepted
    assert reason in result.reason


@pytest.mark.parametrize("name", ["astronaut", "cat", "coins", "clock", "grass"])
def test_photographs_are_refused(name: str) -> None:
    data = pytest.importorskip("skimage.data")
    grey = np.asarray(Image.fromarray(getattr(data, name)()).convert("L"))
    result = _check().check(resize_square(grey, 192))
    assert not result.accepted and result.reasons


@needs_real
@pytest.mark.parametrize("turn", ["rot90", "rot180", "inverted"])
def test_turned_and_inverted_films_are_refused(turn: str) -> None:
    check = _check()
    refused = 0
    for path in RSNA_FILES + KERMANY_FILES:
        film = _film(path)
        image = {"rot90": np.rot90(film), "rot180": np.rot90(film, 2), "inverted": 255 - film}
        refused += not check.check(np.ascontiguousarray(image[turn])).accepted
    assert refused >= 10, refused  # of 12


@pytest.mark.parametrize(
    ("tags", "refused", "text"),
    [
        ({"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}, False, ""),
        ({"Modality": "DX", "ViewPosition": "AP"}, False, ""),
        ({"Modality": "CT"}, True, "Modality is CT"),
        ({"Modality": "MG"}, True, "Modality is MG"),
        ({"Modality": "CR", "BodyPartExamined": "HAND"}, True, "BodyPartExamined is HAND"),
        ({"Modality": "DX", "ViewPosition": "LL"}, True, "lateral"),
        ({"Modality": "CR", "ViewPosition": "LATERAL"}, True, "lateral"),
        ({"Modality": "OT"}, False, ""),
    ],
)
def test_dicom_tags_refuse_other_modalities_body_parts_and_lateral_views(
    tags: dict[str, str], refused: bool, text: str
) -> None:
    reasons, _ = check_dicom_tags(tags)
    assert bool(reasons) == refused
    assert text in " ".join(reasons)


@needs_real
def test_predict_refuses_with_reason_no_probability_and_exit_status_3(
    tmp_path: Path, checkpoint: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(inputs / "black.png")
    lateral = pydicom.dcmread(RSNA_FILES[0])
    lateral.ViewPosition = "LL"
    lateral.save_as(inputs / "lateral.dcm")
    (inputs / "film.dcm").write_bytes(RSNA_FILES[1].read_bytes())
    result = predict_paths([inputs], tmp_path / "out", model=checkpoint, device="cpu", workers=1)
    rows = {r.id: r for r in result.rows}
    assert rows["film"].status == "ok" and rows["film"].probability is not None
    for name, text in (("black", "blank"), ("lateral", "lateral")):
        row = rows[name]
        assert row.status == "refused" and text in row.error and row.probability is None
        record = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert "probability" not in record and "boxes" not in record and "decision" not in record
        assert text in record["refused"] and not record["input_check"]["accepted"]
        assert not (tmp_path / "out" / f"{name}.png").exists()
    summary = (tmp_path / "out" / "summary.csv").read_text()
    assert "black,in/black.png,,,,refused," in summary
    assert result.exit_code == 3
    film = json.loads((tmp_path / "out" / "film.json").read_text())
    assert film["input_check"]["accepted"]
    # --no-input-check: every readable image gets a probability again
    again = predict_paths(
        [inputs], tmp_path / "out2", model=checkpoint, device="cpu", workers=1, input_check=False
    )
    assert all(r.status == "ok" for r in again.rows) and again.exit_code == 0


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_untrained_checkpoint(tmp_path / "model.pt", size=64, threshold=0.5)


def test_ood_statistics_round_trip_and_refuse_far_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(0, 1, (300, 20))
    model = fit_ood_model(
        {"a": (real[:200], real[200:]), "b": (real[:200] + 5, real[200:] + 5)},
        weights_sha256="abc",
    )
    path = model.save(tmp_path / "m.ood.safetensors")
    from pneumoloc.io.payload import load_payload

    again = OodModel.from_payload(load_payload(path))
    far = rng.normal(0, 1, (10, 20)) + 20
    assert (again.score(real[200:]) <= 1.0).mean() > 0.95
    assert (again.score(real[200:] + 5) <= 1.0).mean() > 0.95  # the second source
    assert (again.score(far) > 1.0).all()


def test_calibrate_ood_fits_any_checkpoint_and_is_ignored_for_other_weights(
    tmp_path: Path, checkpoint: Path
) -> None:
    data = write_folder_dataset(tmp_path / "d", n_per_class=20, size=64)
    cache = prepare_cache(data, tmp_path / "c", size=64, workers=1, progress=False)
    result = calibrate_ood(checkpoint, [cache.root], device="cpu")
    assert result.path == ood_path(checkpoint) and result.path.is_file()
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    check = InputCheck.for_predictor(predictor)
    assert check.ood is not None and check.mode == "features+image"
    pred = predictor.predict_arrays(
        np.asarray(cache.images[:2]), [(64, 64)] * 2, with_features=True
    )
    assert pred[0].features is not None and pred[0].features.ndim == 1
    # statistics of other weights (a re-issued model) are not used
    assert load_ood_model(checkpoint, "0" * 64) is None


def test_serve_refuses_a_non_chest_upload_with_422_and_a_reason(checkpoint: Path) -> None:
    pytest.importorskip("fastapi")
    import io

    from fastapi.testclient import TestClient

    from pneumoloc.serve import ServeSettings, create_app

    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(buffer, format="PNG")
    files = {"file": ("black.png", buffer.getvalue(), "image/png")}
    with TestClient(create_app(predictor), base_url="http://127.0.0.1") as client:
        answer = client.post("/api/predict", files=files)
    assert answer.status_code == 422
    body = answer.json()
    assert body["error"] == "not_a_chest_radiograph" and "blank" in body["detail"]
    assert "probability" not in body
    off = create_app(predictor, ServeSettings(input_check=False))
    with TestClient(off, base_url="http://127.0.0.1") as client:
        assert client.post("/api/predict", files=files).status_code == 200
