"""A ``predict`` run: :func:`predict_paths`, from arguments to ``summary.csv``.

It checks the arguments, loads the model, collects the inputs and their ids, runs the
pipeline (:func:`pneumoloc.predict.pipeline.predict_all`) and writes the summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pneumoloc.errors import ConfigError, DataError
from pneumoloc.predict.inputs import assign_ids, collect_inputs
from pneumoloc.predict.outputs import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_REFUSED,
    PredictRow,
    _write_summary,
)
from pneumoloc.predict.pipeline import PredictInterrupted, WorkerDied, predict_all
from pneumoloc.predict.runfolder import claim_output_folder, pending_row, pseudonymise

logger = logging.getLogger("pneumoloc.predict")  # the name of the module before the split

__all__ = ["PredictRunResult", "predict_paths"]


@dataclass
class PredictRunResult:
    """What :func:`predict_paths` did.

    Attributes:
        out: The output folder (resolved).
        summary: The ``summary.csv`` written.
        rows: One per input, in input order.
        backend: ``"torch"`` or ``"onnx"``.
        model_id: The model's short id.
        seconds: Wall time, model loading included.
    """

    out: Path
    summary: Path
    rows: list[PredictRow] = field(default_factory=list)
    backend: str = "torch"
    model_id: str = ""
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        """Inputs that could not be read (or written)."""
        return sum(r.status == STATUS_FAILED for r in self.rows)

    @property
    def n_refused(self) -> int:
        """Inputs the input check refused (not frontal chest radiographs): no probability."""
        return sum(r.status == STATUS_REFUSED for r in self.rows)

    @property
    def n_ok(self) -> int:
        """Inputs predicted."""
        return sum(r.status == STATUS_OK for r in self.rows)

    @property
    def exit_code(self) -> int:
        """The CLI's exit status: 0 when every input was predicted, 1 when any could not be
        read, else 3 when any was refused by the input check."""
        if self.n_failed:
            return 1
        return 3 if self.n_refused else 0


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _output_folder(out: str | Path) -> Path:
    """``out`` created and resolved; a :class:`DataError` if it is a file."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: --out must be a folder, and this is a file")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir.resolve()


def predict_paths(
    inputs: Iterable[str | Path],
    out: str | Path,
    *,
    model: str | Path = "default",
    backend: str = "auto",
    cam_method: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    keep_identifiers: bool = False,
    overlays: bool = True,
    workers: int | None = None,
    threads: int | None = None,
    use_detector: bool = True,
    parallel: str = "auto",
    progress: bool = True,
    dicom_out: str | Path | None = None,
    input_check: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    pseudonymise_ids: bool = False,
    pseudonym_key: str | None = None,
) -> PredictRunResult:
    """Predict every image of ``inputs``; write records, overlays and ``summary.csv`` to ``out``.

    Args:
        inputs: Files and folders (searched recursively) of DICOM, PNG or JPEG images.
        out: Output folder (created).
        model: Checkpoint, exported ``.onnx`` (with ``backend="onnx"``), or "default".
        backend: "auto" (ONNX Runtime on a CPU when the checkpoint has an ONNX twin), "torch"
            or "onnx" (see :func:`pneumoloc.inference.load_predictor`).
        cam_method: Heatmap method (default: the model's).
        device: "auto" (GPU if available), "cpu" or "cuda"; torch backend only.
        batch_size: Images per forward pass (default: see :func:`default_batch_size`).
        keep_identifiers: Add the DICOM identifiers to the JSON records.
        overlays: Write an overlay PNG per image.
        workers: Workers decoding inputs and finishing and writing outputs (default: one per
            core; 1 does everything in the calling thread).
        threads: Intra-op threads of the network (default: the library's, one per core). For
            torch this is ``torch.set_num_threads`` for the duration of the call (restored
            after). 1 can be much faster on a machine busy with other work: PyTorch's OpenMP
            threads wait on each other, and one descheduled thread stalls every layer.
        use_detector: Use the model's self-trained detector for boxes and heatmaps, if it has
            one (False: the box rule and the CAM, faster; ``--no-detector``).
        parallel: Whether the workers are threads or processes: "auto" (processes for 32
            inputs or more when the backend is ONNX Runtime; see
            :mod:`pneumoloc.predict.pipeline`), "threads" or "processes". The outputs are the
            same either way.
        progress: Show a progress bar.
        dicom_out: Folder (created) for a DICOM SR and Secondary Capture per DICOM input
            (``pneumoloc[pacs]``; see :mod:`pneumoloc.report.dicom`). These carry the
            source's identifiers, on purpose.
        input_check: Check each image is a frontal chest radiograph before any probability
            is given (:mod:`pneumoloc.inference.input_check`); a refused image gets a
            ``refused`` row and record with the reasons, and no probability.
        resume: Continue an earlier run in ``out``: inputs whose records it finished are
            skipped (see :mod:`pneumoloc.predict.runfolder`).
        overwrite: Delete an earlier run's outputs in ``out`` first. Without ``resume`` or
            ``overwrite``, an ``out`` holding an earlier run's outputs is refused.
        pseudonymise_ids: Name outputs (ids, ``source``, overlay titles) by keyed pseudonyms
            instead of the input file names.
        pseudonym_key: The key of the pseudonyms (default: one kept in the output folder).

    Returns:
        The rows of the summary (``exit_code`` is 1 when any input failed, 3 when any was
        refused and none failed).

    Raises:
        DataError: An input does not exist, no image was found, or ``out`` is a file.
        ConfigError: ``out`` holds an earlier run and neither ``resume`` nor ``overwrite``.
        WorkerDied: A worker process died; ``summary.csv`` has been written as for Ctrl-C.
        PredictInterrupted: Ctrl-C; ``summary.csv`` has been written (unfinished inputs
            have status "interrupted"), and ``resume=True`` continues.
        ConfigError, CheckpointError: See :func:`pneumoloc.inference.load_predictor`.
    """
    from pneumoloc._runtime import available_cores
    from pneumoloc.inference.loading import default_batch_size, load_predictor

    started = time.perf_counter()
    out_dir = _output_folder(out)
    files = collect_inputs(inputs, exclude=out_dir)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    batch_size = default_batch_size(backend, device) if batch_size is None else batch_size
    if pseudonymise_ids:
        files, ids = pseudonymise(files, out_dir, pseudonym_key)
    else:
        ids = assign_ids(files, out_dir)
    predictor = load_predictor(
        model,
        backend,
        device=device,
        cam_method=cam_method,
        batch_size=batch_size,
        threads=threads,
        use_detector=use_detector,
    )
    claim = claim_output_folder(out_dir, ids, files, resume=resume, overwrite=overwrite)
    checker = None
    if input_check:
        from pneumoloc.inference.input_check import InputCheck

        checker = InputCheck.for_predictor(predictor)
        logger.info("input check: %s", checker.mode)
    todo = [i for i, image_id in enumerate(ids) if image_id not in claim.finished]
    all_rows: list[PredictRow | None] = [claim.finished.get(image_id) for image_id in ids]
    try:
        new_rows: list[PredictRow | None] = list(
            predict_all(
                predictor,
                [files[i] for i in todo],
                [ids[i] for i in todo],
                out_dir,
                batch_size=batch_size,
                n_workers=workers if workers is not None else available_cores(),
                torch_threads=threads if predictor.backend == "torch" else None,
                overlays=overlays,
                keep_identifiers=keep_identifiers,
                progress=progress,
                dicom_out=_output_folder(dicom_out) if dicom_out is not None else None,
                input_check=checker,
                parallel=parallel,
            )
        )
    except (PredictInterrupted, WorkerDied) as stop:
        for i, row in zip(todo, stop.rows, strict=True):
            all_rows[i] = row
        pending = [row or pending_row(ids[i], files[i].source) for i, row in enumerate(all_rows)]
        summary = _write_summary(out_dir, pending)
        logger.warning(
            "%s: %d of %d input(s) done; %s written; continue with --resume",
            "interrupted" if isinstance(stop, PredictInterrupted) else "stopped",
            sum(r is not None for r in all_rows),
            len(ids),
            summary,
        )
        raise
    for i, row in zip(todo, new_rows, strict=True):
        all_rows[i] = row
    rows = [r for r in all_rows if r is not None]
    summary = _write_summary(out_dir, rows)
    result = PredictRunResult(
        out=out_dir,
        summary=summary,
        rows=rows,
        backend=predictor.backend,
        model_id=predictor.model_id,
        seconds=time.perf_counter() - started,
    )
    if result.n_failed:
        logger.warning(
            "%d of %d inputs could not be read; see %s", result.n_failed, len(rows), summary
        )
    if result.n_refused:
        logger.warning(
            "%d of %d inputs were refused by the input check (not frontal chest radiographs, "
            "no probability given); see %s",
            result.n_refused,
            len(rows),
            summary,
        )
    return result
