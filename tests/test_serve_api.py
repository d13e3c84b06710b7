"""``pneumoloc serve``: the JSON API answers good uploads, refuses bad ones clearly, stays safe."""

from __future__ import annotations

import io
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
from fastapi.testclient import TestClient

from conftest import crafted_png
from pneumoloc import DISCLAIMER
from pneumoloc.cli import main
from pneumoloc.data.synthetic import SynthConfig, generate_rsna
from pneumoloc.errors import ConfigError
from pneumoloc.inference import Predictor
from pneumoloc.models import build_model
from pneumoloc.models.checkpoint import save_checkpoint
from pneumoloc.serve import LIMITS_TEXT, ServeSettings, create_app, is_loopback, resolve_token

TOKEN = "s3cret-token"
# The server answers Host names of this machine only; fastapi's TestClient says "testserver".
LOCAL = "http://localhost"
MODEL_ID = "smallcamnet@32px-abc123de"
SECRETS = ("Doe^Jane", "Doe", "Jane", "SECRET123")


def make_checkpoint(path: Path, image_size: int = 32) -> Path:
    """smallcamnet with seeded weights whose CAM is positive, saved like a trained model.

    The head's weights are made positive and its bias zero so the heatmap is never all zero,
    and the threshold is 0 so every image gets boxes (known answer without training).
    """
    torch.manual_seed(0)
    model = build_model("smallcamnet")
    with torch.no_grad():
        model.head.weight.copy_(torch.rand_like(model.head.weight) * 0.1)
        model.head.bias.zero_()
    save_checkpoint(
        path,
        {
            "model": model.spec,
            "state_dict": model.state_dict(),
            "image_size": image_size,
            "threshold": 0.0,
            "box_config": {"rule": "peak", "peak_fraction": 0.85},
            "label_names": ["Normal", "Lung Opacity"],
            "data": {"fingerprint": "abc123def456", "kind": "synthetic", "n_train": 28},
            "metrics": {"val": {"auroc": 0.75, "loss": 0.6, "curve": [1, 2, 3]}},
            "epoch": 2,
        },
    )
    return path


def synthetic_dicoms(root: Path, n: int = 2, image_size: int = 64) -> list[Path]:
    """Synthetic RSNA-like JPEG Baseline DICOMs."""
    generate_rsna(root, SynthConfig(n=n, seed=5, image_size=image_size, prevalence=1.0))
    return sorted((root / "stage_2_train_images").glob("*.dcm"))


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve-model") / "tiny.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def dicom_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_dicoms(tmp_path_factory.mktemp("serve-dicoms"))[0]


@pytest.fixture(scope="module")
def client(predictor: Predictor) -> Iterator[TestClient]:
    with TestClient(create_app(predictor), base_url=LOCAL) as c:
        yield c


def post(client: TestClient, name: str, data: bytes, **kwargs: Any) -> Any:
    return client.post(
        "/api/predict", files={"file": (name, data, "application/octet-stream")}, **kwargs
    )


def assert_good(body: dict[str, Any], shape: tuple[int, int]) -> None:
    assert 0.0 <= body["probability"] <= 1.0
    assert body["decision"] == "pneumonia"  # threshold 0
    assert body["boxes"], "threshold 0 and a positive CAM must give boxes"
    for box in body["boxes"]:
        assert 0 <= box["x"] < shape[1] and 0 <= box["y"] < shape[0]
        assert box["width"] > 0 and box["height"] > 0 and 0 < box["confidence"] <= 1
    assert (body["image_height"], body["image_width"]) == shape
    assert body["disclaimer"] == DISCLAIMER and body["limits"] == LIMITS_TEXT
    assert body["model"]["model_id"] == body["model_id"] == MODEL_ID


# -------------------------------------------------------------------------- endpoints


def test_health_model_and_openapi(client: TestClient) -> None:
    assert client.get("/api/health").json() == {"status": "ok"}
    card = client.get("/api/model").json()
    assert card["model_id"] == MODEL_ID and card["image_size"] == 32
    assert card["threshold"] == 0.0 and card["cam_method"] == "cam"
    assert card["metrics"] == {"val": {"auroc": 0.75, "loss": 0.6}}  # the curve is dropped
    assert card["data"]["n_train"] == 28 and card["epoch"] == 2
    assert card["label_names"] == ["Normal", "Lung Opacity"]
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/api/predict"]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert {"200", "400", "401", "413", "415", "422"} <= set(op["responses"])
    props = schema["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"probability", "decision", "boxes", "images", "model"} <= set(props)
    assert set(schema["paths"]) >= {"/api/health", "/api/model", "/api/predict"}
    page = client.get("/")
    assert page.status_code == 200 and "Research use only" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    # No asset is fetched from another site: the page works offline.
    for text in (
        page.text,
        client.get("/static/app.js").text,
        client.get("/static/style.css").text,
    ):
        assert "http://" not in text and "https://" not in text
    assert client.get("/docs").status_code == 404  # FastAPI's docs would load a CDN


def test_dicom_upload_gives_record_and_images(
    client: TestClient, dicom_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_temp_files(*args: object, **kwargs: object) -> None:
        raise AssertionError("an upload must be processed in memory")

    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_temp_files)
    response = post(client, dicom_path.name, dicom_path.read_bytes(), params={"images": 1})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert_good(body, (64, 64))
    assert body["id"] == dicom_path.name
    assert body["input"]["format"] == "dicom"
    assert body["input"]["bytes"] == dicom_path.stat().st_size
    assert body["input"]["view_position"] == pydicom.dcmread(dicom_path).ViewPosition
    xray = Image.open(io.BytesIO(_b64(body["images"]["xray_png_b64"])))
    heat = Image.open(io.BytesIO(_b64(body["images"]["heatmap_png_b64"])))
    assert xray.mode == "L" and xray.size == (64, 64) == (body["images"]["width"],) * 2
    assert heat.mode == "RGBA" and heat.size == (32, 32)
    alpha = np.asarray(heat)[..., 3]
    assert alpha.max() == 255 and alpha.min() < 255  # alpha is the (normalised) heat
    # Without the flag, no images (smaller answers for scripts).
    plain = post(client, dicom_path.name, dicom_path.read_bytes()).json()
    assert plain["images"] is None and plain["probability"] == body["probability"]


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def test_png_upload_matches_the_one_inference_path(
    client: TestClient, predictor: Predictor, dicom_path: Path
) -> None:
    from pneumoloc.inference import prediction_record
    from pneumoloc.io import read_xray_bytes

    pixels = pydicom.dcmread(dicom_path).pixel_array
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data = buf.getvalue()
    body = post(client, "../../etc/chest x-ray.png", data).json()
    assert_good(body, (64, 64))
    assert body["id"] == "chest_x-ray.png"  # sanitised, never a path
    expected = prediction_record(
        predictor.predict_xrays([read_xray_bytes(data, "x", min_size=32)])[0],
        predictor,
        image_id="chest_x-ray.png",
    )
    assert {k: body[k] for k in expected} == expected


# -------------------------------------------------------------------------- bad uploads


def _no_pixels(dicom_path: Path) -> bytes:
    ds = pydicom.dcmread(dicom_path)
    del ds.PixelData
    return dicom_bytes(ds)


def _truncated(dicom_path: Path) -> bytes:
    data = dicom_path.read_bytes()
    return data[: len(data) - 600]


BAD_UPLOADS = {
    "random bytes": (lambda p: np.random.default_rng(0).bytes(3000), 415, "not_an_image"),
    "empty file": (lambda p: b"", 400, "empty_file"),
    "text renamed .dcm": (lambda p: b"PatientName: nobody\n" * 20, 415, "not_an_image"),
    "PNG declaring 100000 x 100000": (
        lambda p: crafted_png(100_000, 100_000),
        413,
        "image_too_large",
    ),
    "DICOM without pixel data": (_no_pixels, 422, "no_pixel_data"),
    "truncated DICOM": (_truncated, 422, "truncated_image"),
}


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_clear_4xx_and_server_survives(
    client: TestClient, dicom_path: Path, case: str
) -> None:
    make, status, code = BAD_UPLOADS[case]
    response = post(client, "upload.dcm", make(dicom_path))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["detail"], str) and len(body["detail"]) > 10
    assert client.get("/api/health").status_code == 200
    assert post(client, "again.dcm", dicom_path.read_bytes()).status_code == 200


def test_malformed_requests(client: TestClient) -> None:
    r = client.post("/api/predict", content=b"raw", headers={"content-type": "image/png"})
    assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type"
    r = client.post("/api/predict", files={"other": ("a.png", b"x", "image/png")})
    assert r.status_code == 400 and "file" in r.json()["detail"]
    r = client.post(
        "/api/predict",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nab',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert r.status_code == 400 and r.json()["error"] == "bad_request"


def test_oversize_upload_is_413_even_without_content_length(
    predictor: Predictor, dicom_path: Path
) -> None:
    data = dicom_path.read_bytes()
    app = create_app(predictor, ServeSettings(max_upload_bytes=len(data) - 1))
    with TestClient(app, base_url=LOCAL) as c:
        r = post(c, "big.dcm", data)
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        assert "limit" in r.json()["detail"]

        # A chunked body (no Content-Length): the limit is enforced while reading the stream.
        boundary = "bnd"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="b.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        seen = []

        def chunks() -> Iterator[bytes]:
            yield head
            for start in range(0, 10 * len(data), 4096):
                seen.append(start)
                yield (data * 10)[start : start + 4096]
            yield f"\r\n--{boundary}--\r\n".encode()

        r = c.post(
            "/api/predict",
            content=chunks(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert r.status_code == 413
        assert "content-length" not in {k.lower() for k in r.request.headers}
        # The same file just under the limit is accepted.
        ok = create_app(predictor, ServeSettings(max_upload_bytes=len(data)))
        with TestClient(ok, base_url=LOCAL) as c2:
            assert post(c2, "fits.dcm", data).status_code == 200


def test_absurd_declared_dimensions_refused_before_decoding(
    predictor: Predictor, dicom_path: Path
) -> None:
    app = create_app(predictor, ServeSettings(max_pixels=64 * 64 - 1))
    with TestClient(app, base_url=LOCAL) as c:
        r = post(c, "x.dcm", dicom_path.read_bytes())
        assert r.status_code == 413 and "64 x 64" in r.json()["detail"]


# -------------------------------------------------------------------------- access control


def test_token_required_on_api_but_health(predictor: Predictor, dicom_path: Path) -> None:
    app = create_app(predictor, ServeSettings(token=TOKEN))
    with TestClient(app, base_url=LOCAL) as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/").status_code == 200  # the page itself asks the user for the token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = c.get("/api/model", headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            r = post(c, "a.dcm", dicom_path.read_bytes(), headers=headers)
            assert r.status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/api/model", headers=good).status_code == 200
        assert post(c, "a.dcm", dicom_path.read_bytes(), headers=good).status_code == 200


def test_non_loopback_host_needs_a_token(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match="without an access token"):
            create_app(predictor, ServeSettings(host=host))
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
    assert create_app(predictor, ServeSettings(host="0.0.0.0", token=TOKEN)) is not None
    monkeypatch.setenv("PNEUMOLOC_TOKEN", "from-env")
    assert resolve_token(None) == "from-env" and resolve_token("given") == "given"
    monkeypatch.delenv("PNEUMOLOC_TOKEN")
    assert resolve_token(None) is None


def test_cli_refuses_public_host_without_token_before_loading(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import uvicorn

    monkeypatch.delenv("PNEUMOLOC_TOKEN", raising=False)
    loads: list[object] = []
    real = Predictor.from_checkpoint.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Predictor], *args: Any, **kwargs: Any) -> Predictor:
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(counting))
    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--model", str(checkpoint), "--host", "0.0.0.0"]) == 2
    assert "without an access token" in caplog.text and not loads and not served

    assert main(["serve", "--model", str(checkpoint), "--port", "8123"]) == 0
    assert len(loads) == 1 and len(served) == 1
    app, kwargs = served[0]
    assert kwargs["host"] == "127.0.0.1" and kwargs["port"] == 8123 and kwargs["workers"] == 1
    assert app.state.engine.settings.token is None


# -------------------------------------------------------------------------- privacy


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_no_identifying_tags_in_responses_or_logs(
    client: TestClient, dicom_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = pydicom.dcmread(dicom_path)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET123"
    ds.PatientBirthDate = "19700101"
    tagged = dicom_bytes(ds)
    del ds.PixelData
    no_pixels = dicom_bytes(ds)
    assert b"SECRET123" in tagged and b"Doe^Jane" in no_pixels
    texts = []
    with caplog.at_level(logging.DEBUG):
        for data, status in ((tagged, 200), (no_pixels, 422), (tagged[:-500], 422)):
            r = post(client, "scan.dcm", data, params={"images": 1})
            assert r.status_code == status
            texts.append(r.text)
    texts.append(caplog.text)
    assert "upload #" in caplog.text  # the logs were captured
    for text in texts:
        for secret in (*SECRETS, "19700101"):
            assert secret not in text
    # The server's own log lines name uploads by number, never by file name.
    served = [r.getMessage() for r in caplog.records if r.name.startswith("pneumoloc.serve")]
    assert served and not any("scan" in line for line in served)


# -------------------------------------------------------------------------- concurrency


def test_concurrent_requests_share_one_model(
    checkpoint: Path, dicom_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[int] = []
    real_init = Predictor.__init__

    def counting_init(self: Predictor, *args: Any, **kwargs: Any) -> None:
        built.append(id(self))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "__init__", counting_init)
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    assert len(built) == 1

    users: set[int] = set()
    active = [0, 0]  # (now, most at once) inside the model
    guard = threading.Lock()
    real_predict = Predictor.predict_xrays

    def watched(self: Predictor, xrays: Any, **kwargs: Any) -> Any:
        with guard:
            users.add(id(self))
            active[0] += 1
            active[1] = max(active[1], active[0])
        try:
            return real_predict(self, xrays, **kwargs)
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(Predictor, "predict_xrays", watched)

    # A slow decode makes requests overlap, so the test shows they are really concurrent.
    import pneumoloc.serve.engine as serve_engine

    decoding = [0, 0]
    real_read = serve_engine.read_xray_bytes

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        with guard:
            decoding[0] += 1
            decoding[1] = max(decoding[1], decoding[0])
        try:
            time.sleep(0.02)
            return real_read(*args, **kwargs)
        finally:
            with guard:
                decoding[0] -= 1

    monkeypatch.setattr(serve_engine, "read_xray_bytes", slow_read)
    data = dicom_path.read_bytes()
    results: list[tuple[int, float, list[Any]]] = []
    errors: list[BaseException] = []

    with TestClient(create_app(predictor, ServeSettings(workers=4)), base_url=LOCAL) as c:

        def worker() -> None:
            try:
                for _ in range(3):
                    r = post(c, "c.dcm", data)
                    body = r.json()
                    with guard:
                        results.append((r.status_code, body["probability"], body["boxes"]))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors
    assert len(results) == 24
    assert {status for status, _, _ in results} == {200}
    assert len({p for _, p, _ in results}) == 1
    assert all(boxes == results[0][2] for _, _, boxes in results)
    assert built == [id(predictor)] and users == {id(predictor)}
    assert decoding[1] >= 2  # requests were processed concurrently...
    assert active[1] == 1  # ...but the model is used by one request at a time
