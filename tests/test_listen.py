"""``pneumoloc listen`` in-process: the C-STORE handler's statuses, the bounded queue, and a
listener that forwards its results to a fake PACS (a pynetdicom storage SCP on loopback).
A small fake model keeps it fast; tests/test_pacs_e2e.py runs the real one against Orthanc."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pynetdicom = pytest.importorskip("pynetdicom", reason="needs pneumoloc[pacs] (pynetdicom)")
pytest.importorskip("highdicom", reason="needs pneumoloc[pacs] (highdicom)")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from pneumoloc.errors import ConfigError  # noqa: E402
from pneumoloc.inference.base import BasePredictor  # noqa: E402
from pneumoloc.listen import Destination, ListenConfig, Listener  # noqa: E402
from pneumoloc.listen import statuses as st  # noqa: E402
from pneumoloc.listen.contexts import ANALYSED_SOP_CLASSES, supported_contexts  # noqa: E402
from pneumoloc.listen.handler import StoreHandler  # noqa: E402
from pneumoloc.report.dicom import result_summary  # noqa: E402

CR = "1.2.840.10008.5.1.4.1.1.1"


@dataclass(kw_only=True)
class BrightnessPredictor(BasePredictor):
    """A stand-in model: probability = mean brightness, heatmap = the image."""

    def network(self, images: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = np.asarray(images, dtype=np.uint8)
        probs = pixels.reshape(len(pixels), -1).mean(axis=1) / 255.0
        return probs, pixels.astype(np.float32) / 255.0, pixels


def fake_predictor() -> BrightnessPredictor:
    return BrightnessPredictor(
        meta={"image_size": 32, "threshold": 0.3, "model": {"name": "brightness"}}, batch_size=1
    )


def xray(rows: int = 64, cols: int = 48, *, pixels: bool = True, sop_class: str = CR) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "LISTEN-1", "Test^Patient", "CR"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels:
        ds.PixelData = film(rows, cols).tobytes()
    return ds


def film(rows: int, cols: int) -> np.ndarray:
    """Smooth, many grey levels, a bright "opacity": passes the input check's statistics."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = 40 + 120 * yy / rows + 40 * np.sin(xx / cols * np.pi)
    img += 60 * np.exp(-(((yy - rows * 0.4) / 8) ** 2 + ((xx - cols * 0.4) / 6) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


def file_bytes(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class FakeEvent:
    """What the handler reads of a pynetdicom C-STORE event."""

    def __init__(self, data: bytes, sop_class: str, syntax: str = ExplicitVRLittleEndian) -> None:
        self._data = data
        self.request = type("Request", (), {"AffectedSOPClassUID": sop_class})()
        self.context = type("Context", (), {"transfer_syntax": syntax})()

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        return self._data


def status_of(response: Any) -> int:
    return int(response) if isinstance(response, int) else int(response.Status)


# ---------------------------------------------------------------------------------------
# The handler, without a network
# ---------------------------------------------------------------------------------------


def test_handler_statuses() -> None:
    jobs: queue.Queue[Any] = queue.Queue(maxsize=4)
    handler = StoreHandler(jobs, image_size=32)
    good = xray()
    assert status_of(handler(FakeEvent(file_bytes(good), CR))) == st.SUCCESS
    job = jobs.get_nowait()
    assert job.pixels.shape == (32, 32) and job.original_shape == (64, 48)
    assert job.header.SOPInstanceUID == good.SOPInstanceUID and "PixelData" not in job.header

    cases = {
        "sr": (
            FakeEvent(
                file_bytes(xray(sop_class="1.2.840.10008.5.1.4.1.1.88.11")),
                "1.2.840.10008.5.1.4.1.1.88.11",
            ),
            st.SOP_CLASS_NOT_SUPPORTED,
        ),
        "no pixels": (FakeEvent(file_bytes(xray(pixels=False)), CR), st.NOT_MATCHING_SOP_CLASS),
        "class mismatch": (
            FakeEvent(file_bytes(good), "1.2.840.10008.5.1.4.1.1.7"),
            st.NOT_MATCHING_SOP_CLASS,
        ),
        "random bytes": (
            FakeEvent(bytes(128) + b"DICM" + np.random.default_rng(0).bytes(999), CR),
            st.CANNOT_UNDERSTAND,
        ),
        "truncated": (FakeEvent(file_bytes(good)[:-1000], CR), st.CANNOT_UNDERSTAND),
        "colour": (FakeEvent(file_bytes(_colour()), CR), st.UNSUPPORTED_IMAGE),
        "blank (input check)": (FakeEvent(file_bytes(_blank()), CR), st.INPUT_CHECK_FAILED),
        "lateral (input check)": (FakeEvent(file_bytes(_lateral()), CR), st.INPUT_CHECK_FAILED),
    }
    for name, (event, expected) in cases.items():
        response = handler(event)
        assert status_of(response) == expected, name
        assert response.ErrorComment and len(response.ErrorComment) <= 64, name
    assert jobs.empty()
    assert handler.counts["accepted"] == 1 and sum(handler.counts.values()) == 1 + len(cases)


def _blank() -> Dataset:
    ds = xray()
    ds.PixelData = np.full((64, 48), 128, np.uint8).tobytes()
    return ds


def _lateral() -> Dataset:
    ds = xray()
    ds.ViewPosition = "LL"
    return ds


def _colour() -> Dataset:
    ds = xray()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.zeros((64, 48, 3), np.uint8).tobytes()
    return ds


def test_full_queue_is_refused_with_out_of_resources() -> None:
    jobs: queue.Queue[Any] = queue.Queue(maxsize=1)
    handler = StoreHandler(jobs, image_size=32)
    assert status_of(handler(FakeEvent(file_bytes(xray()), CR))) == st.SUCCESS
    response = handler(FakeEvent(file_bytes(xray()), CR))
    assert status_of(response) == st.OUT_OF_RESOURCES
    assert handler.counts["queue_full"] == 1


def test_contexts_accept_jpeg_baseline_for_radiographs_only() -> None:
    contexts = dict(supported_contexts())
    for sop_class in ANALYSED_SOP_CLASSES:
        assert "1.2.840.10008.1.2.4.50" in contexts[sop_class]
    assert contexts["1.2.840.10008.5.1.4.1.1.2"] == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert "1.2.840.10008.1.1" in contexts  # C-ECHO


def test_config_checks() -> None:
    dest = Destination.parse("ORTHANC@127.0.0.1:4242")
    assert (dest.ae_title, dest.host, dest.port) == ("ORTHANC", "127.0.0.1", 4242)
    assert Destination.parse("PACS@[::1]:104").host == "::1"
    for bad in ("127.0.0.1:4242", "X@host", "X@host:port"):
        with pytest.raises(ConfigError):
            Destination.parse(bad)
    with pytest.raises(ConfigError, match="AE title"):
        ListenConfig(ae_title="A" * 17, destination=dest)
    with pytest.raises(ConfigError, match="nowhere"):
        ListenConfig()
    with pytest.raises(ConfigError, match="queue"):
        ListenConfig(destination=dest, queue_size=0)
    assert ListenConfig(destination=dest).host == "127.0.0.1"  # loopback by default


# ---------------------------------------------------------------------------------------
# A listener forwarding to a fake PACS
# ---------------------------------------------------------------------------------------


class FakePacs:
    def __init__(self) -> None:
        self.received: list[Dataset] = []
        self.arrived = threading.Condition()
        ae = pynetdicom.AE(ae_title="FAKEPACS")
        for sop_class in ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"):
            ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(pynetdicom.evt.EVT_C_STORE, self.store)]
        )
        self.port = int(self.server.server_address[1])

    def store(self, event: Any) -> int:
        with self.arrived:
            self.received.append(event.dataset)
            self.arrived.notify_all()
        return 0x0000

    def wait_for(self, n: int, timeout: float = 30) -> list[Dataset]:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.received) < n and time.monotonic() < deadline:
                self.arrived.wait(0.2)
        return list(self.received)


def send(port: int, ds: Dataset, ae_title: str = "PNEUMOLOC") -> int:
    ae = pynetdicom.AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    return int(status.Status)


def test_listener_forwards_sr_and_sc_to_the_pacs(tmp_path: Path) -> None:
    pacs = FakePacs()
    config = ListenConfig(
        port=0,
        destination=Destination("127.0.0.1", pacs.port, "FAKEPACS"),
        dicom_out=tmp_path / "copies",
        drain_seconds=10,
    )
    listener = Listener(config, predictor=fake_predictor())
    _, port = listener.start()
    try:
        source = xray()
        assert send(port, source) == st.SUCCESS
        assert send(port, xray(pixels=False)) == st.NOT_MATCHING_SOP_CLASS
        received = pacs.wait_for(2)
        assert sorted(ds.Modality for ds in received) == ["CR", "SR"]
        sr = next(ds for ds in received if ds.Modality == "SR")
        summary = result_summary(sr)
        assert summary["referenced_sop_instance_uid"] == source.SOPInstanceUID
        assert all(ds.StudyInstanceUID == source.StudyInstanceUID for ds in received)
        # The same prediction as predict_arrays on the pixels predict would read.
        expected = fake_predictor().predict_xrays([_read(source)])[0]
        assert summary["probability"] == pytest.approx(expected.probability, abs=1e-6)
        assert len(summary["boxes"]) == len(expected.boxes)
        assert sorted(p.name for p in (tmp_path / "copies").iterdir()) == [
            "000001.sc.dcm",
            "000001.sr.dcm",
        ]
    finally:
        listener.stop(drain_seconds=5)
        pacs.server.shutdown()
    counts = listener.counts
    assert counts["accepted"] == 1 and counts["no_pixel_data"] == 1 and counts["sent"] == 1


def _read(ds: Dataset) -> Any:
    from pneumoloc.io import read_xray_bytes

    return read_xray_bytes(file_bytes(ds), "x", min_size=32)


def test_unreachable_destination_is_logged_and_the_listener_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = int(s.getsockname()[1])
    config = ListenConfig(
        port=0, destination=Destination("127.0.0.1", dead, "NOBODY"), send_retries=0
    )
    listener = Listener(config, predictor=fake_predictor())
    _, port = listener.start()
    try:
        assert send(port, xray()) == st.SUCCESS
        deadline = time.monotonic() + 30
        while listener.counts["send_failed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listener.counts["send_failed"] == 1
        assert send(port, xray()) == st.SUCCESS  # still serving
    finally:
        listener.stop(drain_seconds=5)
    assert "LISTEN-1" not in caplog.text and "Test^Patient" not in caplog.text


def test_wrong_called_ae_title_is_rejected() -> None:
    config = ListenConfig(port=0, dicom_out=Path("unused"))
    listener = Listener(config, predictor=fake_predictor())
    _, port = listener.start()
    try:
        ae = pynetdicom.AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        assert ae.associate("127.0.0.1", port, ae_title="SOMEONE").is_rejected
        assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOLOC")
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        listener.stop(drain_seconds=1)


@dataclass(kw_only=True)
class FeaturePredictor(BrightnessPredictor):
    """The stand-in model with pooled features: 4 numbers per image (its mean brightness)."""

    def network_with_features(
        self, images: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        probs, maps, pixels = self.network(images)
        return probs, maps, pixels, np.repeat(probs[:, None], 4, axis=1).astype(np.float32)


def test_worker_applies_the_feature_check_and_sends_nothing_for_a_refused_image(
    tmp_path: Path,
) -> None:
    """The handler checks tags and statistics before answering; the feature distance needs
    the forward pass, so the worker applies it: a refused image gets no SR, no SC."""
    from pneumoloc.inference.input_check import InputCheck
    from pneumoloc.inference.ood import fit_ood_model
    from pneumoloc.io.preprocess import resize_square
    from pneumoloc.listen.handler import Job
    from pneumoloc.listen.worker import AnalysisWorker

    rng = np.random.default_rng(0)
    source = xray()
    data = file_bytes(source)
    pixels = resize_square(_read(source).pixels, 32)

    def job(number: int) -> Job:
        return Job(number=number, data=data, pixels=pixels, original_shape=(64, 48), header=source)

    config = ListenConfig(port=0, dicom_out=tmp_path / "copies")
    predictor = FeaturePredictor(meta=dict(fake_predictor().meta), batch_size=1)
    worker = AnalysisWorker(queue.Queue(), predictor, config)
    assert worker.check is None  # a model without feature statistics: nothing more to check
    near = rng.normal(0.0, 1.0, (300, 4)) * 0.05 + pixels.mean() / 255.0
    far = rng.normal(0.0, 1.0, (300, 4)) * 0.05 + 5.0
    for number, real in ((1, near), (2, far)):
        worker.check = InputCheck(
            layout=None, ood=fit_ood_model({"a": (real[:200], real[200:])}, weights_sha256="x")
        )
        worker.process(job(number))
    written = sorted(p.name for p in (tmp_path / "copies").iterdir())
    assert written == ["000001.sc.dcm", "000001.sr.dcm"]  # nothing for the refused #2
    assert worker.counts["analysed"] == 1 and worker.counts["refused"] == 1
