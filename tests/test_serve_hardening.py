"""Issue 14, defects 1 and 5 on ``pneumoloc serve``: Host allow-list, no server paths, the
token out of ``ps``, a positive upload limit, bounded concurrent uploads, deflate bombs.

Each ``test_defect_*`` fails on the code before issue 14.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
from fastapi.testclient import TestClient

import fuzzing
from pneumoloc.cli import main
from pneumoloc.errors import ConfigError
from pneumoloc.inference import Predictor
from pneumoloc.serve import ServeSettings, create_app
from test_serve_api import LOCAL, TOKEN, make_checkpoint, post, synthetic_dicoms

SECRET_DIR = "/srv/hospital-secret"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("private-model-folder")


@pytest.fixture(scope="module")
def checkpoint(model_dir: Path) -> Path:
    path = make_checkpoint(model_dir / "tiny.pt")
    import torch

    payload = torch.load(path, weights_only=True)
    payload["data"]["source"] = f"{SECRET_DIR}/rsna"  # where the training data lay
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def dicom_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return synthetic_dicoms(tmp_path_factory.mktemp("hardening-dicoms"))[0].read_bytes()


@pytest.fixture
def no_uvicorn(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Any, dict]]]:
    """uvicorn.run replaced: the apps the CLI would serve, with their keyword arguments."""
    import uvicorn

    served: list[tuple[Any, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    monkeypatch.delenv("PNEUMOLOC_TOKEN", raising=False)
    yield served


# -------------------------------------------------------------------------- Host header


def test_defect_host_header_outside_allow_list_refused(
    predictor: Predictor, dicom_bytes: bytes
) -> None:
    # A DNS-rebinding page reaches 127.0.0.1 under its own name: Host: evil.example.
    with TestClient(create_app(predictor), base_url="http://evil.example:8000") as c:
        for method, url in (("get", "/api/health"), ("get", "/api/model"), ("get", "/")):
            r = getattr(c, method)(url)
            assert r.status_code == 421, url
            assert r.json()["error"] == "host_not_allowed"
            assert r.headers["x-content-type-options"] == "nosniff"
        r = post(c, "x.dcm", dicom_bytes)
        assert r.status_code == 421
    with TestClient(create_app(predictor), base_url=LOCAL) as c:
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
            assert c.get("/api/health", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "127.0.0.1.evil.example", "localhost.evil:80", "[::2]:80"):
            assert c.get("/api/health", headers={"host": host}).status_code == 421, host


def test_allowed_hosts_are_configurable() -> None:
    from pneumoloc.serve.settings import host_allowed

    names = ServeSettings(allowed_hosts=("XRay.example",)).host_names
    assert {"localhost", "127.0.0.1", "::1", "xray.example"} <= names
    assert host_allowed("xray.example:8443", names) and not host_allowed("other.example", names)
    assert not host_allowed(None, names) and not host_allowed("", names)
    bound = ServeSettings(host="192.168.1.20", token=TOKEN).host_names
    assert "192.168.1.20" in bound  # the bind address names the server
    assert "0.0.0.0" not in ServeSettings(host="0.0.0.0", token=TOKEN).host_names
    with pytest.raises(ConfigError, match="needs an access token"):
        ServeSettings(allowed_hosts=("*",))
    assert host_allowed("any.example", ServeSettings(allowed_hosts=("*",), token=TOKEN).host_names)


def test_cli_allowed_host_option(checkpoint: Path, no_uvicorn: list) -> None:
    assert main(["serve", "--model", str(checkpoint), "--allowed-host", "ward-pc"]) == 0
    app, _ = no_uvicorn[0]
    assert "ward-pc" in app.state.engine.settings.host_names
    with TestClient(app, base_url="http://ward-pc:8000") as c:
        assert c.get("/api/health").status_code == 200


# -------------------------------------------------------------------------- server paths


@pytest.mark.filterwarnings("ignore:Expected implicit VR")
def test_defect_no_absolute_server_paths_in_responses(
    predictor: Predictor, model_dir: Path, dicom_bytes: bytes
) -> None:
    with TestClient(create_app(predictor), base_url=LOCAL) as c:
        card = c.get("/api/model")
        answers = [card.text, post(c, "x.dcm", dicom_bytes, params={"images": 1}).text]
        answers.append(post(c, "bad.dcm", b"DICM" * 40).text)
        answers.append(c.get("/openapi.json").text)
    for text in answers:
        assert str(model_dir) not in text and SECRET_DIR not in text
        assert '"/' not in text.replace('"/api', "").replace('"/static', "")
    body = card.json()
    assert body["checkpoint"] == "tiny.pt"  # the file name still tells models apart
    assert body["data"]["source"] == "rsna" and body["data"]["fingerprint"] == "abc123def456"


# -------------------------------------------------------------------------- token


def test_defect_token_read_from_file_or_environment_not_command_line(
    checkpoint: Path,
    tmp_path: Path,
    no_uvicorn: list,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    token_file.chmod(0o600)
    args = ["serve", "--model", str(checkpoint), "--host", "0.0.0.0"]
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--token-file", str(token_file)]) == 0
    assert no_uvicorn[-1][0].state.engine.settings.token == "from-a-file"
    assert "deprecated" not in caplog.text

    monkeypatch.setenv("PNEUMOLOC_TOKEN", "from-the-environment")
    assert main(args) == 0
    assert no_uvicorn[-1][0].state.engine.settings.token == "from-the-environment"
    monkeypatch.delenv("PNEUMOLOC_TOKEN")

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--token", "on-the-command-line"]) == 0
    assert "deprecated" in caplog.text and "ps" in caplog.text
    assert "on-the-command-line" not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([*args, "--token", "x", "--token-file", str(token_file)]) == 2
        assert main([*args, "--token-file", str(tmp_path / "absent")]) == 2
    assert "not both" in caplog.text and "cannot read the token file" in caplog.text
    assert len(no_uvicorn) == 3


def test_token_file_rules(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pneumoloc.serve.settings import read_token_file

    path = tmp_path / "t"
    path.write_text("  abc  \nsecond line ignored\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert read_token_file(path) == "abc"
    assert "other users" in caplog.text and "abc" not in caplog.text
    path.write_text("\n \n")
    with pytest.raises(ConfigError, match="empty"):
        read_token_file(path)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_token_file(tmp_path)


# -------------------------------------------------------------------------- upload limit


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_defect_max_upload_mb_zero_refused(
    checkpoint: Path, no_uvicorn: list, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["serve", "--model", str(checkpoint), f"--max-upload-mb={value}"]) == 2
    assert "--max-upload-mb must be a positive number" in caplog.text
    assert not no_uvicorn


# -------------------------------------------------------------------------- bombs, concurrency


def test_defect_deflate_bomb_uploads_refused_413(predictor: Predictor, dicom_bytes: bytes) -> None:
    bomb = fuzzing.deflate_bomb(256 << 20, 1024, 1024)  # 256 kB -> 256 MiB
    with TestClient(create_app(predictor), base_url=LOCAL) as c:
        before = post(c, "real.dcm", dicom_bytes).status_code
        statuses: list[tuple[int, str]] = []

        def upload() -> None:
            r = post(c, "bomb.dcm", bomb)
            statuses.append((r.status_code, r.json()["error"]))

        threads = [threading.Thread(target=upload) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert statuses == [(413, "image_too_large")] * 4
        assert post(c, "real.dcm", dicom_bytes).status_code == before


def test_defect_concurrent_uploads_bounded(
    predictor: Predictor, dicom_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pneumoloc.serve.engine as serve_engine

    guard = threading.Lock()
    decoding = [0, 0]  # now, most at once
    real_read = serve_engine.read_xray_bytes

    def slow_read(*args: Any, **kwargs: Any) -> Any:
        with guard:
            decoding[0] += 1
            decoding[1] = max(decoding[1], decoding[0])
        try:
            time.sleep(0.05)
            return real_read(*args, **kwargs)
        finally:
            with guard:
                decoding[0] -= 1

    monkeypatch.setattr(serve_engine, "read_xray_bytes", slow_read)
    settings = ServeSettings(workers=4, max_concurrent_uploads=2)
    statuses: list[int] = []
    with TestClient(create_app(predictor, settings), base_url=LOCAL) as c:

        def worker() -> None:
            for _ in range(2):
                statuses.append(post(c, "c.dcm", dicom_bytes).status_code)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert len(statuses) == 12 and len(set(statuses)) == 1
    assert decoding[1] == 2  # concurrent, but never more than the bound
    with pytest.raises(ConfigError, match="max_concurrent_uploads"):
        ServeSettings(max_concurrent_uploads=0)
