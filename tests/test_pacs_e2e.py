"""End to end against a real PACS: storescu -> ``pneumoloc listen`` -> Orthanc.

Orthanc (Debian ``orthanc``) runs on loopback ports with a temporary storage folder; DCMTK's
``storescu`` (Debian ``dcmtk``) is the modality and sends real RSNA DICOMs (JPEG Baseline,
proposed with ``-xy``) to ``pneumoloc listen`` (a subprocess, the shipped model on the CPU),
which sends an SR and a Secondary Capture per image to Orthanc. The results are read back
through Orthanc's REST API and compared with ``predict`` on the same files. Bad inputs (a
non-image SOP class, random bytes, corrupt pixel data, an image without pixel data, an
unsupported transfer syntax, a deflate bomb) each get their status and the listener keeps
serving. ``.ci/run`` installs Orthanc, DCMTK and dicom3tools; elsewhere the test is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pynetdicom = pytest.importorskip("pynetdicom", reason="needs pneumoloc[pacs] (pynetdicom)")
pytest.importorskip("highdicom", reason="needs pneumoloc[pacs] (highdicom)")

import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset, write_file_meta_info  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from conftest import RSNA_SAMPLE  # noqa: E402

ORTHANC = shutil.which("Orthanc")
STORESCU = shutil.which("storescu")
DCIODVFY = shutil.which("dciodvfy")
IMAGES = RSNA_SAMPLE / "stage_2_train_images"

pytestmark = [
    pytest.mark.skipif(
        ORTHANC is None, reason="Orthanc is not installed (apt-get install orthanc)"
    ),
    pytest.mark.skipif(
        STORESCU is None, reason="storescu is not installed (apt-get install dcmtk)"
    ),
    pytest.mark.skipif(not IMAGES.is_dir(), reason="the RSNA sample in ../shared/data is absent"),
    pytest.mark.timeout(300),
]

LISTENER_AE = "PNEUMOLOC"
ORTHANC_AE = "ORTHANC"
MPEG2 = "1.2.840.10008.1.2.4.100"  # a transfer syntax nothing in pneumoloc decodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sources() -> list[Path]:
    """Two positive and one negative RSNA image (the first of each in sorted order)."""
    import pandas as pd

    labels = pd.read_csv(RSNA_SAMPLE / "stage_2_train_labels.csv")
    have = {p.stem for p in IMAGES.glob("*.dcm")}
    labels = labels[labels["patientId"].isin(have)]
    pos = sorted(set(labels.loc[labels["Target"] == 1, "patientId"]))[:2]
    neg = sorted(set(labels.loc[labels["Target"] == 0, "patientId"]))[:1]
    return [IMAGES / f"{pid}.dcm" for pid in pos + neg]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # loopback only
        data = response.read()
    return json.loads(data) if data[:1] in (b"{", b"[") else data


# ---------------------------------------------------------------------------------------
# Orthanc, the listener, predict
# ---------------------------------------------------------------------------------------


class Orthanc:
    def __init__(self, root: Path) -> None:
        self.dicom_port, self.http_port = _free_port(), _free_port()
        config = {
            "Name": "pneumoloc-e2e",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "DicomAet": ORTHANC_AE,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,  # HTTP from loopback only
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomAlwaysAllowStore": True,
            "StableAge": 1,
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = root / "orthanc.log"
        assert ORTHANC is not None
        with self.log.open("w") as fh:
            self.process = subprocess.Popen(
                [ORTHANC, str(root / "orthanc.json")], stdout=fh, stderr=subprocess.STDOUT
            )
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                _get(self.url + "/system")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"Orthanc did not start:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.2)

    def instances(self) -> list[str]:
        return list(_get(self.url + "/instances"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


def _echo(port: int) -> bool:
    ae = pynetdicom.AE(ae_title="E2E-TEST")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=LISTENER_AE)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


class ListenerProcess:
    def __init__(self, root: Path, orthanc: Orthanc) -> None:
        self.port = _free_port()
        self.log = root / "listen.log"
        command = [
            sys.executable,
            "-m",
            "pneumoloc",
            "listen",
            "--ae-title",
            LISTENER_AE,
            "--port",
            str(self.port),
            "--dest",
            f"{ORTHANC_AE}@127.0.0.1:{orthanc.dicom_port}",
            "--device",
            "cpu",
            "--queue-size",
            "8",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
        with self.log.open("w") as fh:
            self.process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while not _echo(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"pneumoloc listen did not start:\n{self.text()[-3000:]}")
            time.sleep(0.5)

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def listener_process(
    tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc
) -> Iterator[ListenerProcess]:
    proc = ListenerProcess(tmp_path_factory.mktemp("listen"), orthanc)
    yield proc
    # Clean shutdown on SIGTERM: the queue finished, the counters logged, exit status 0.
    proc.process.send_signal(signal.SIGTERM)
    try:
        code = proc.process.wait(90)
    except subprocess.TimeoutExpired:
        proc.process.kill()
        pytest.fail(f"pneumoloc listen did not stop on SIGTERM:\n{proc.text()[-3000:]}")
    assert code == 0, proc.text()[-3000:]
    assert "SIGTERM received" in proc.text() and "stopped:" in proc.text()


@pytest.fixture(scope="module")
def predicted(
    tmp_path_factory: pytest.TempPathFactory, listener_process: ListenerProcess
) -> dict[str, Any]:
    """``predict`` on the same files (records by source SOP Instance UID), with --dicom-out;
    run while the listener starts."""
    from pneumoloc.predict import predict_paths

    root = tmp_path_factory.mktemp("predict")
    result = predict_paths(
        _sources(),
        root / "out",
        device="cpu",
        overlays=False,
        progress=False,
        dicom_out=root / "dicom",
    )
    assert result.n_failed == 0
    records = {}
    for row in result.rows:
        assert row.json_path is not None
        uid = str(pydicom.dcmread(next(p for p in _sources() if p.stem == row.id)).SOPInstanceUID)
        records[uid] = json.loads(row.json_path.read_text())
    return {"records": records, "dicom": root / "dicom"}


@pytest.fixture(scope="module")
def listener(listener_process: ListenerProcess, predicted: dict[str, Any]) -> ListenerProcess:
    """The listener, answering C-ECHO."""
    listener_process.wait_ready()
    return listener_process


@pytest.fixture(scope="module")
def delivered(orthanc: Orthanc, listener: ListenerProcess) -> dict[str, dict[str, Dataset]]:
    """The sources stored in Orthanc by storescu, and their results by the listener."""
    sources = [str(p) for p in _sources()]
    assert STORESCU is not None
    # The modality stores the images in the PACS, and (a routing rule) at pneumoloc.
    for port, ae in ((orthanc.dicom_port, ORTHANC_AE), (listener.port, LISTENER_AE)):
        done = subprocess.run(
            [STORESCU, "-xy", "-aet", "MODALITY", "-aec", ae, "127.0.0.1", str(port), *sources],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    expected = 3 * len(sources)  # each source, its SR and its Secondary Capture
    deadline = time.monotonic() + 180
    while len(orthanc.instances()) < expected:
        if time.monotonic() > deadline or listener.process.poll() is not None:
            pytest.fail(f"results did not arrive:\n{listener.text()[-3000:]}")
        time.sleep(0.5)
    by_source: dict[str, dict[str, Dataset]] = {}
    for instance in orthanc.instances():
        ds = pydicom.dcmread(DicomBytesIO(_get(f"{orthanc.url}/instances/{instance}/file")))
        if ds.Modality == "SR":
            source = ds.CurrentRequestedProcedureEvidenceSequence[0]
            uid = str(
                source.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            )
            kind = "sr"
        elif "SourceImageSequence" in ds:
            uid, kind = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID), "sc"
        else:
            uid, kind = str(ds.SOPInstanceUID), "source"
        assert kind not in by_source.setdefault(uid, {}), f"two {kind} for one source"
        by_source[uid][kind] = ds
    return by_source


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------


def _file_bytes(ds: Dataset, syntax: str, body: bytes | None = None) -> bytes:
    """Preamble, file meta for ``syntax`` and ``body`` (default: ``ds`` encoded explicit LE)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    if body is None:
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, False
        write_dataset(out, ds)
        body = out.getvalue()
    return bytes(128) + b"DICM" + buf.getvalue() + body


def _image_header(rows: int = 64, cols: int = 64) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "E2E-BAD", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def _bad_inputs() -> dict[str, tuple[bytes, str, int]]:
    """name -> (file bytes, transfer syntax proposed, expected status)."""
    from pydicom.encaps import encapsulate

    cases: dict[str, tuple[bytes, str, int]] = {}
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: not an image
    report.SOPInstanceUID = generate_uid()
    report.StudyInstanceUID, report.SeriesInstanceUID = generate_uid(), generate_uid()
    report.Modality = "SR"
    cases["non-image SOP class"] = (
        _file_bytes(report, ExplicitVRLittleEndian),
        ExplicitVRLittleEndian,
        0x0122,
    )
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cases["random bytes"] = (
        _file_bytes(_image_header(), ExplicitVRLittleEndian, noise),
        ExplicitVRLittleEndian,
        0xC000,
    )
    no_pixels = _image_header()
    cases["image without pixel data"] = (
        _file_bytes(no_pixels, ExplicitVRLittleEndian),
        ExplicitVRLittleEndian,
        0xA900,
    )
    corrupt = _image_header(1024, 1024)
    real_frame = pydicom.dcmread(_sources()[0]).PixelData
    corrupt.PixelData = encapsulate([bytes(real_frame[16:4000])])  # a cut, headless JPEG
    corrupt["PixelData"].VR = "OB"
    cases["corrupt JPEG pixel data"] = (
        _file_bytes(corrupt, JPEGBaseline8Bit),
        JPEGBaseline8Bit,
        0xC000,
    )
    if (Path(__file__).parents[1] / "src/pneumoloc/io/deflate.py").is_file():
        # 64 MiB of zeros declared as the pixel data of a 64 x 64 image: refused while inflating.
        head = DicomBytesIO()
        head.is_little_endian, head.is_implicit_VR = True, False
        write_dataset(head, _image_header())
        inflated = 64 << 20
        element = (0x7FE0).to_bytes(2, "little") + (0x0010).to_bytes(2, "little") + b"OB\0\0"
        element += inflated.to_bytes(4, "little")
        comp = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        zeros = bytes(1 << 20)
        body = comp.compress(head.getvalue() + element)
        body += b"".join(comp.compress(zeros) for _ in range(inflated >> 20)) + comp.flush()
        bomb = _image_header()
        cases["deflate bomb"] = (
            _file_bytes(bomb, DeflatedExplicitVRLittleEndian, body),
            DeflatedExplicitVRLittleEndian,
            0xA700,
        )
    return cases


def test_bad_inputs_get_their_status_and_the_listener_keeps_serving(
    listener: ListenerProcess, tmp_path: Path
) -> None:
    from pynetdicom import _config

    cases = _bad_inputs()
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the files' bytes as they are
    try:
        for name, (data, syntax, expected) in cases.items():
            path = tmp_path / f"{len(os.listdir(tmp_path))}.dcm"
            path.write_bytes(data)
            sop_class = pydicom.filereader.read_file_meta_info(path).MediaStorageSOPClassUID
            ae = pynetdicom.AE(ae_title="E2E-TEST")
            ae.add_requested_context(sop_class, [syntax])
            assoc = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE)
            assert assoc.is_established, name
            status = assoc.send_c_store(path)
            assoc.release()
            assert status and status.Status == expected, (
                f"{name}: got {status.Status if status else None:#06x}, expected {expected:#06x}"
            )
            assert "ErrorComment" in status, name
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked

    # An unsupported transfer syntax is refused at association time: the context is rejected
    # (result 4, "transfer syntaxes not supported"), the association itself is accepted.
    ae = pynetdicom.AE(ae_title="E2E-TEST")
    ae.add_requested_context(SecondaryCaptureImageStorage, [MPEG2])
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE)
    assert assoc.is_established
    assert [c.abstract_syntax for c in assoc.rejected_contexts] == [SecondaryCaptureImageStorage]
    assert assoc.rejected_contexts[0].result == 0x04
    assert assoc.send_c_echo().Status == 0
    assoc.release()

    # A wrong called AE title is refused, and the listener still answers.
    ae = pynetdicom.AE(ae_title="E2E-TEST")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="NOT-PNEUMOLOC")
    assert assoc.is_rejected
    assert _echo(listener.port)
    assert listener.process.poll() is None


# ---------------------------------------------------------------------------------------
# Results in the PACS
# ---------------------------------------------------------------------------------------


def test_results_sit_in_the_source_study(
    delivered: dict[str, dict[str, Dataset]], orthanc: Orthanc
) -> None:
    assert len(delivered) == len(_sources())
    studies = _get(orthanc.url + "/studies")
    assert len(studies) == len(_sources())  # no new study: each result filed with its source
    for uid, found in delivered.items():
        assert set(found) == {"source", "sr", "sc"}, uid
        source, sr, sc = found["source"], found["sr"], found["sc"]
        for result in (sr, sc):
            assert result.StudyInstanceUID == source.StudyInstanceUID
            assert result.PatientID == source.PatientID
            assert result.PatientName == source.PatientName
            assert result.PatientSex == source.PatientSex
            assert result.SeriesInstanceUID != source.SeriesInstanceUID
            assert result.SOPInstanceUID != source.SOPInstanceUID
        assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
        assert sr.VerificationFlag == "UNVERIFIED"
    for study in studies:
        series = _get(f"{orthanc.url}/studies/{study}")["Series"]
        assert len(series) == 3  # the X-ray, the SR, the Secondary Capture


def test_results_equal_predict(
    delivered: dict[str, dict[str, Dataset]], predicted: dict[str, Any]
) -> None:
    from pneumoloc.report.dicom import result_summary  # parses with highdicom

    assert set(delivered) == set(predicted["records"])
    for uid, found in delivered.items():
        record = predicted["records"][uid]
        summary = result_summary(found["sr"])
        assert summary["referenced_sop_instance_uid"] == uid
        assert summary["probability"] == pytest.approx(record["probability"], abs=1e-6)
        assert summary["threshold"] == pytest.approx(record["threshold"], abs=1e-6)
        assert summary["decision"] == record["decision"]
        assert len(summary["boxes"]) == len(record["boxes"])
        for got, want in zip(summary["boxes"], record["boxes"], strict=True):
            for key in ("x", "y", "width", "height"):
                assert got[key] == pytest.approx(want[key], abs=0.06), key
            assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-4)
            assert got["referenced_sop_instance_uid"] == uid
    # predict --dicom-out wrote the same results for the same files.
    for path in sorted(predicted["dicom"].glob("*.sr.dcm")):
        summary = result_summary(pydicom.dcmread(path))
        record = predicted["records"][summary["referenced_sop_instance_uid"]]
        assert summary["probability"] == pytest.approx(record["probability"], abs=1e-6)
        assert len(summary["boxes"]) == len(record["boxes"])


def test_the_listener_logs_no_patient_attribute(
    delivered: dict[str, dict[str, Dataset]], listener: ListenerProcess
) -> None:
    text = listener.text()
    assert "SR and Secondary Capture stored" in text
    for found in delivered.values():
        source = found["source"]
        for value in (
            source.PatientID,
            str(source.PatientName),
            source.SOPInstanceUID,
            source.StudyInstanceUID,
        ):
            assert str(value) not in text


@pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy is not installed (apt-get install dicom3tools)"
)
def test_results_pass_dciodvfy(delivered: dict[str, dict[str, Dataset]], tmp_path: Path) -> None:
    assert DCIODVFY is not None
    for uid, found in list(delivered.items())[:1]:
        for kind in ("sr", "sc"):
            path = tmp_path / f"{kind}.dcm"
            found[kind].save_as(path, enforce_file_format=True)
            done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
            errors = [
                line
                for line in (done.stdout + done.stderr).splitlines()
                if line.startswith("Error")
            ]
            assert not errors, f"{kind} of {uid}: {errors}"
