"""``pneumoloc serve`` end to end in a real browser (Debian's chromium driven by Playwright).

Starts uvicorn on a free loopback port in a background thread, uploads a synthetic DICOM through
the page's file input, checks the result text and the overlay canvas, moves the opacity slider,
switches layers, downloads the JSON record, and saves a screenshot to ``artifacts/``.

Without ``/usr/bin/chromium`` the test is skipped, except under CI (``CI`` set to true), where
chromium is installed on purpose and its absence is a defect.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
import uvicorn

from pneumoloc.inference import Predictor
from pneumoloc.serve import create_app
from test_serve_api import make_checkpoint, synthetic_dicoms

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = pytest.mark.browser


def _require_browser() -> Any:
    in_ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    if not CHROMIUM.exists():
        if in_ci:
            pytest.fail(f"{CHROMIUM} is missing under CI, which installs it: the setup is broken")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if in_ci:
            pytest.fail("playwright is missing under CI (the [dev] extra installs it)")
        pytest.skip("playwright is not installed")
    return sync_playwright


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a uvicorn server on 127.0.0.1 (a free port), stopped after the module."""
    root = tmp_path_factory.mktemp("serve-browser")
    predictor = Predictor.from_checkpoint(
        make_checkpoint(root / "tiny.pt", image_size=32), device="cpu"
    )
    app = create_app(predictor)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _canvas_stats(page: Any) -> dict[str, float]:
    """Size, number of distinct grey levels and a checksum of the overlay canvas."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('overlay');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let sum = 0, colour = 0; const levels = new Set();
            for (let i = 0; i < d.length; i += 4) {
                sum += d[i] * 3 + d[i + 1] * 5 + d[i + 2] * 7;
                levels.add(d[i]);
                if (Math.abs(d[i] - d[i + 2]) > 30) colour += 1;
            }
            return {w: c.width, h: c.height, levels: levels.size, sum: sum, colour: colour};
        }"""
    )


def test_upload_view_and_download_in_chromium(
    server: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    sync_playwright = _require_browser()
    dicom = synthetic_dicoms(tmp_path_factory.mktemp("browser-dicom"), n=1, image_size=256)[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            page.set_default_timeout(15_000)
            outside: list[str] = []
            page.on(
                "request",
                lambda r: (
                    None if r.url.startswith((server, "data:", "blob:")) else outside.append(r.url)
                ),
            )
            page.goto(server + "/")
            assert "Research use only" in page.inner_text("header")
            page.wait_for_selector("#model-info dd:has-text('smallcamnet')")

            page.set_input_files("#file-input", str(dicom))
            page.wait_for_selector("#probability-text:not(:empty)")
            text = page.inner_text("#probability-text")
            assert text.endswith("%") and 0.0 <= float(text[:-1]) <= 100.0
            assert "pneumonia suspected" in page.inner_text("#decision-text")
            assert "not a diagnosis" in page.inner_text("#result")
            rows = page.locator("#boxes-body tr")
            assert rows.count() >= 1  # threshold 0: the model always gives boxes

            both = _canvas_stats(page)
            assert both["w"] == both["h"] >= 256  # square like the X-ray
            assert both["levels"] > 20 and both["colour"] > 100  # an X-ray with a heatmap

            page.fill("#opacity", "0")  # range inputs take fill(); fires 'input'
            assert page.inner_text("#opacity-value") == "0%"
            no_heat = _canvas_stats(page)
            assert no_heat["sum"] != both["sum"]
            page.fill("#opacity", "100")
            full_heat = _canvas_stats(page)
            assert full_heat["colour"] > both["colour"]

            page.check("input[name=layer][value=boxes]")
            boxes_only = _canvas_stats(page)
            page.check("input[name=layer][value=heatmap]")
            heat_only = _canvas_stats(page)
            assert len({boxes_only["sum"], heat_only["sum"], full_heat["sum"]}) == 3
            page.check("input[name=layer][value=both]")
            page.fill("#opacity", "60")

            with page.expect_download() as info:
                page.click("#download")
            saved = tmp_path / "record.json"
            info.value.save_as(saved)
            record = json.loads(saved.read_text())
            assert record["id"] == dicom.name and "images" not in record
            assert 0.0 <= record["probability"] <= 1.0 and record["boxes"]

            # A bad file gives a readable message and the page keeps working.
            bad = tmp_path / "notes.dcm"
            bad.write_text("not an image")
            page.set_input_files("#file-input", str(bad))
            page.wait_for_selector("#error:not([hidden])")
            assert "not a DICOM, PNG or JPEG" in page.inner_text("#error")

            page.set_input_files("#file-input", str(dicom))
            page.wait_for_selector("#error", state="hidden")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve-e2e.png"), full_page=True)
            assert not outside, f"the page fetched from elsewhere: {outside}"
        finally:
            browser.close()
