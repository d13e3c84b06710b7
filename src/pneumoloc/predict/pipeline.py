"""The pipeline of a ``predict`` run: decoding, the model and writing kept busy together.

A pool of workers decodes the inputs (in order, a bounded number ahead, :func:`_ordered`) and
finishes each image (post-processing, the input check, rendering and writing its outputs),
while the calling thread runs the model in batches (:class:`_Batcher`). With one worker
everything runs in the calling thread (:class:`_InlineExecutor`). The network's intra-op
threads can be set for the duration of a run (:func:`_torch_threads`). :func:`predict_all`
puts these together.

The workers are threads, or, on Linux, for a large enough run of a backend that can leave its
network behind (ONNX Runtime), processes (:data:`PROCESS_MIN_INPUTS`): decoding a DICOM, the
lung mask and the overlay spend much of their time in Python, and on two cores threads
serialise on the interpreter lock (about 165% CPU). A worker process is forked with
everything but the network (:func:`_process_pool`: the predictor without its session, the
input check, the output folders), ignores Ctrl-C (the calling process stops the run and lets
the images in flight finish), and computes exactly what a thread would: the same functions on
the same arrays (tests/test_predict_parallel.py compares the outputs).
"""

from __future__ import annotations

import logging
import signal
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pneumoloc.errors import PneumolocError
from pneumoloc.predict.inputs import InputFile, ReadResult, read_input
from pneumoloc.predict.outputs import (
    STATUS_FAILED,
    STATUS_REFUSED,
    PredictRow,
    _write_outputs,
    _write_refused,
)

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from pneumoloc.inference import BasePredictor
    from pneumoloc.inference.input_check import InputCheck

logger = logging.getLogger("pneumoloc.predict")  # the name of the module before the split

__all__ = [
    "PARALLEL_MODES",
    "PROCESS_MIN_INPUTS",
    "PredictInterrupted",
    "WorkerDied",
    "predict_all",
]

PARALLEL_MODES = ("auto", "threads", "processes")
"""How :func:`predict_all` runs its workers: "auto" (processes for a run of at least
:data:`PROCESS_MIN_INPUTS` inputs when the backend allows it and there are two workers or more,
else threads), or always threads / processes."""

PROCESS_MIN_INPUTS = 32
"""The smallest run for which "auto" starts worker processes: starting one costs about half a
second of imports, which a run this long earns back."""


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``rows`` holds the summary rows of the inputs finished so far
    (None for the others), so the caller can write ``summary.csv`` before stopping."""

    def __init__(self, rows: list[PredictRow | None]) -> None:
        super().__init__()
        self.rows = rows


class WorkerDied(PneumolocError):
    """A worker process died (killed for memory, a crash in a decoder); ``rows`` as for
    :class:`PredictInterrupted`, so that the caller writes ``summary.csv`` and ``--resume``
    skips what was finished."""

    def __init__(self, message: str, rows: list[PredictRow | None]) -> None:
        super().__init__(message)
        self.rows = rows


_T = TypeVar("_T")


class _InlineExecutor(Executor):
    """Runs each task at submission, in the calling thread (``workers <= 1``)."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def _ordered(
    pool: Executor, fn: Callable[[InputFile], ReadResult], items: Sequence[InputFile], ahead: int
) -> Iterator[ReadResult]:
    """``fn`` over ``items`` in order, at most ``ahead`` submitted but not yet consumed."""
    pending: deque[Future[ReadResult]] = deque()
    todo = iter(items)
    for item in todo:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (nothing when None), restored after."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _Context:
    """What a worker needs to decode an input and to finish an image: all but the network."""

    predictor: BasePredictor
    out: Path
    overlays: bool
    keep_identifiers: bool
    dicom_out: Path | None = None
    input_check: InputCheck | None = None

    def read(self, item: InputFile) -> ReadResult:
        return read_input(
            item.path,
            self.predictor.image_size,
            display=self.overlays or self.dicom_out is not None,
            keep_identifiers=self.keep_identifiers,
            check_tags=self.input_check is not None,
        )

    def finish(
        self,
        item: InputFile,
        image_id: str,
        r: ReadResult,
        image: np.ndarray,
        raw: tuple[Any, ...],
    ) -> PredictRow:
        """One image after the network: its prediction, the input check, its outputs."""
        predictor = self.predictor
        pred = predictor.finish(image, raw, [r.original_shape])[0]  # type: ignore[arg-type]
        verdict = None
        if self.input_check is not None:
            verdict = self.input_check.check(image[0], features=pred.features, tags=r.tags)
            if not verdict.accepted:
                return _write_refused(self.out, image_id, item, verdict, r, predictor)
        return _write_outputs(
            self.out,
            image_id,
            item,
            pred,
            r,
            predictor,
            self.overlays,
            self.dicom_out,
            verdict,
        )


_WORKER_CONTEXT: _Context | None = None
"""The context of this worker process (set by :func:`_worker_init`)."""


def _worker_init(context: _Context) -> None:
    """Start of a worker process: keep the context; leave Ctrl-C to the calling process."""
    global _WORKER_CONTEXT
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_CONTEXT = context


def _worker_context() -> _Context:
    if _WORKER_CONTEXT is None:  # pragma: no cover - only if a task outruns its initializer
        raise RuntimeError("worker process without a context")
    return _WORKER_CONTEXT


def _worker_read(item: InputFile) -> ReadResult:
    return _worker_context().read(item)


def _worker_finish(
    item: InputFile, image_id: str, r: ReadResult, image: np.ndarray, raw: tuple[Any, ...]
) -> PredictRow:
    return _worker_context().finish(item, image_id, r, image, raw)


def _worker_ready() -> bool:
    return _WORKER_CONTEXT is not None


def _process_pool(context: _Context, n_workers: int) -> ProcessPoolExecutor:
    """Worker processes forked from this one, each holding ``context`` without the network.

    "fork", not "spawn": a spawned worker spent ~1.5 s importing before its first image,
    more than two workers save on 200 images with two cores; a forked one starts in ~50 ms
    with this process's modules. The workers are forked at once, before this function
    returns and before any other Python thread of the run starts; they never call ONNX
    Runtime, whose threads they do not inherit (its session is left behind,
    :meth:`pneumoloc.inference.BasePredictor.without_network`).
    """
    import importlib
    import multiprocessing
    import warnings

    # Imported here once, not once per worker (highdicom alone takes about a second).
    preload = ["pneumoloc.io.png", "pneumoloc.report.overlay"]
    if context.dicom_out is not None:
        preload += ["highdicom.sr", "pneumoloc.predict.dicom_out", "pneumoloc.report.dicom"]
    for name in preload:
        importlib.import_module(name)

    pool = ProcessPoolExecutor(
        n_workers,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_worker_init,
        initargs=(replace(context, predictor=context.predictor.without_network()),),
    )
    with warnings.catch_warnings():
        # Python >= 3.12 warns of fork() beside native threads (ONNX Runtime's, idle): the
        # workers never use them, and the at-fork handlers reset Python's own locks.
        warnings.simplefilter("ignore", DeprecationWarning)
        if not all(f.result() for f in [pool.submit(_worker_ready) for _ in range(n_workers)]):
            raise RuntimeError("a worker process started without its context")  # pragma: no cover
    return pool


def _can_fork() -> bool:
    import multiprocessing
    import sys

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _use_processes(parallel: str, predictor: BasePredictor, n_inputs: int, n_workers: int) -> bool:
    """Whether this run's workers are processes (see :data:`PARALLEL_MODES`).

    Never while another Python thread runs in this process (a notebook's, a server's, an
    earlier pool's): a thread holding a lock (an import's, say) at the fork leaves it held
    for ever in the child, as seen in this project's tests. Then threads are used, with a
    warning when processes were asked for.
    """
    import threading

    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if parallel == "threads" or n_workers <= 1:
        return False
    if not predictor.can_leave_network or not _can_fork():
        if parallel == "processes":
            raise PneumolocError(
                "worker processes need Linux and a backend that can leave its network behind "
                f"(onnx); here: {predictor.backend!r} on {_platform()}: use --parallel threads"
            )
        return False
    if parallel == "auto" and n_inputs < PROCESS_MIN_INPUTS:
        return False
    if threading.active_count() > 1:
        if parallel == "processes":
            logger.warning(
                "worker threads instead of processes: %d other Python thread(s) run in this "
                "process, and forking beside them is unsafe",
                threading.active_count() - 1,
            )
        return False
    return True


def _platform() -> str:
    import sys

    return sys.platform


class _Batcher:
    """Decoded inputs in; batched predictions out, their writes handed to the pool.

    At most ``2 * n_workers`` writes are pending at a time; ``rows`` gets each input's
    summary row at its input index as its write finishes (or at once for a failed read).
    """

    def __init__(
        self,
        pool: Executor,
        bar: tqdm[Any],
        context: _Context,
        files: Sequence[InputFile],
        ids: Sequence[str],
        *,
        batch_size: int,
        n_workers: int,
        finish: Callable[..., PredictRow],
    ) -> None:
        self._pool, self._bar, self._context = pool, bar, context
        self._predictor, self._check = context.predictor, context.input_check
        self._files, self._ids = files, ids
        self._batch_size, self._n_workers = batch_size, n_workers
        self._finish_image = finish
        self.rows: list[PredictRow | None] = [None] * len(files)
        self._batch: list[tuple[int, ReadResult]] = []
        self._writes: deque[tuple[int, Future[PredictRow]]] = deque()

    def add(self, i: int, decoded: ReadResult) -> None:
        """Queue input ``i`` for the model (a full batch runs), or record why it failed."""
        if decoded.error is not None or decoded.pixels is None:
            logger.warning("%s: skipped: %s", self._files[i].source, decoded.error)
            self.rows[i] = PredictRow(
                self._ids[i],
                self._files[i].source,
                status=STATUS_FAILED,
                error=decoded.error or "?",
            )
            self._bar.update(1)
            return
        self._batch.append((i, decoded))
        if len(self._batch) >= self._batch_size:
            self._flush()

    def close(self) -> None:
        """Run the last, partial batch and wait for every write."""
        self._flush()
        self.drain()

    def drain(self) -> None:
        """Wait for the writes already handed to the pool (the queued batch is dropped)."""
        self._batch.clear()
        while self._writes:
            self._finish(self._writes.popleft())

    def _finish(self, entry: tuple[int, Future[PredictRow]]) -> None:
        try:
            row = entry[1].result()
        except BrokenProcessPool:
            raise WorkerDied(
                f"{self._files[entry[0]].source}: a worker process died while finishing it "
                "(out of memory, or a crash in a decoder); the records already written are "
                "kept: run again with --resume",
                self.rows,
            ) from None
        if row.status == STATUS_REFUSED:
            logger.warning("%s: refused: %s", self._files[entry[0]].source, row.error)
        self.rows[entry[0]] = row
        self._bar.update(1)

    def _flush(self) -> None:
        """The network on the queued batch here; the rest (post-processing, the input check,
        writing) per image in the pool, while the next batch is decoded and run."""
        if not self._batch:
            return
        batch = list(self._batch)
        self._batch.clear()
        stack = np.stack([r.pixels for _, r in batch if r.pixels is not None])
        raw = self._predictor.raw_outputs(stack, with_features=self._check is not None)
        for k, (i, r) in enumerate(batch):
            part = tuple(None if a is None else a[k : k + 1] for a in raw)
            job = self._pool.submit(
                self._finish_image, self._files[i], self._ids[i], r, stack[k : k + 1], part
            )
            self._writes.append((i, job))
            while len(self._writes) > 2 * max(self._n_workers, 1) + self._batch_size:
                self._finish(self._writes.popleft())


def predict_all(
    predictor: BasePredictor,
    files: Sequence[InputFile],
    ids: Sequence[str],
    out: Path,
    *,
    batch_size: int,
    n_workers: int,
    torch_threads: int | None,
    overlays: bool,
    keep_identifiers: bool,
    progress: bool,
    dicom_out: Path | None = None,
    input_check: InputCheck | None = None,
    parallel: str = "auto",
) -> list[PredictRow]:
    """Decode, predict and write every input; its summary rows, in input order.

    With ``dicom_out``, DICOM inputs also get an SR and a Secondary Capture there.
    ``parallel`` chooses threads or processes for the ``n_workers`` workers
    (:data:`PARALLEL_MODES`); the outputs are the same either way.
    """
    from tqdm.auto import tqdm

    context = _Context(
        predictor=predictor,
        out=out,
        overlays=overlays,
        keep_identifiers=keep_identifiers,
        dicom_out=dicom_out,
        input_check=input_check,
    )
    read: Callable[[InputFile], ReadResult]
    finish: Callable[..., PredictRow]
    pool: Executor
    if _use_processes(parallel, predictor, len(files), n_workers):
        pool, read, finish = _process_pool(context, n_workers), _worker_read, _worker_finish
        logger.debug("%d worker processes", n_workers)
    else:
        pool = ThreadPoolExecutor(n_workers) if n_workers > 1 else _InlineExecutor()
        read, finish = context.read, context.finish
        logger.debug("%d worker thread(s)", n_workers)
    with (
        _torch_threads(torch_threads),
        pool,
        tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar,
    ):
        batcher = _Batcher(
            pool,
            bar,
            context,
            files,
            ids,
            batch_size=batch_size,
            n_workers=n_workers,
            finish=finish,
        )
        ahead = max(2 * batch_size, 2 * n_workers)
        try:
            for i, decoded in enumerate(_ordered(pool, read, files, ahead)):
                batcher.add(i, decoded)
            batcher.close()
        except KeyboardInterrupt:
            batcher.drain()  # records already being written are finished, then we stop
            raise PredictInterrupted(batcher.rows) from None
        except BrokenProcessPool:
            raise WorkerDied(
                "a worker process died (out of memory, or a crash in a decoder); the records "
                "already written are kept: run again with --resume",
                batcher.rows,
            ) from None
    return [r for r in batcher.rows if r is not None]
