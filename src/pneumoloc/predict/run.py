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
from pneumoloc.predict.outputs import STATUS_OK, PredictRow, _write_summary
from pneumoloc.predict.pipeline import predict_all

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
        """Inputs that could not be predicted."""
        return sum(r.status != STATUS_OK for r in self.rows)

    @property
    def n_ok(self) -> int:
        """Inputs predicted."""
        return len(self.rows) - self.n_failed

    @property
    def exit_code(self) -> int:
        """0 when every input was predicted, 1 when any failed (the CLI's exit status)."""
        return 1 if self.n_failed else 0


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
    backend: str = "torch",
    cam_method: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    keep_identifiers: bool = False,
    overlays: bool = True,
    workers: int | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> PredictRunResult:
    """Predict every image of ``inputs``; write records, overlays and ``summary.csv`` to ``out``.

    Args:
        inputs: Files and folders (searched recursively) of DICOM, PNG or JPEG images.
        out: Output folder (created).
        model: Checkpoint, exported ``.onnx`` (with ``backend="onnx"``), or "default".
        backend: "torch" or "onnx" (see :func:`pneumoloc.inference.load_predictor`).
        cam_method: Heatmap method (default: the model's).
        device: "auto" (GPU if available), "cpu" or "cuda"; torch backend only.
        batch_size: Images per forward pass (default: see :func:`default_batch_size`).
        keep_identifiers: Add the DICOM identifiers to the JSON records.
        overlays: Write an overlay PNG per image.
        workers: Threads decoding inputs and writing outputs (default: one per core; 1 does
            everything in the calling thread).
        threads: Intra-op threads of the network (default: the library's, one per core). For
            torch this is ``torch.set_num_threads`` for the duration of the call (restored
            after). 1 can be much faster on a machine busy with other work: PyTorch's OpenMP
            threads wait on each other, and one descheduled thread stalls every layer.
        progress: Show a progress bar.

    Returns:
        The rows of the summary (``exit_code`` is 1 when any input failed).

    Raises:
        DataError: An input does not exist, no image was found, or ``out`` is a file.
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
    predictor = load_predictor(
        model, backend, device=device, cam_method=cam_method, batch_size=batch_size, threads=threads
    )
    rows = predict_all(
        predictor,
        files,
        assign_ids(files, out_dir),
        out_dir,
        batch_size=batch_size,
        n_workers=workers if workers is not None else available_cores(),
        torch_threads=threads if backend == "torch" else None,
        overlays=overlays,
        keep_identifiers=keep_identifiers,
        progress=progress,
    )
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
    return result
