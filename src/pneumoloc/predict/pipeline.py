"""The pipeline of a ``predict`` run: decoding, the model and writing kept busy together.

A pool of threads decodes the inputs (in order, a bounded number ahead, :func:`_ordered`) and
renders and writes the outputs, while the calling thread runs the model in batches
(:class:`_Batcher`). With one worker everything runs in the calling thread
(:class:`_InlineExecutor`). The network's intra-op threads can be set for the duration of a
run (:func:`_torch_threads`). :func:`predict_all` puts these together.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from pneumoloc.predict.inputs import InputFile, ReadResult, read_input
from pneumoloc.predict.outputs import STATUS_FAILED, PredictRow, _write_outputs, _write_refused

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from pneumoloc.inference import BasePredictor
    from pneumoloc.inference.input_check import InputCheck

logger = logging.getLogger("pneumoloc.predict")  # the name of the module before the split

__all__ = ["PredictInterrupted", "predict_all"]


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``rows`` holds the summary rows of the inputs finished so far
    (None for the others), so the caller can write ``summary.csv`` before stopping."""

    def __init__(self, rows: list[PredictRow | None]) -> None:
        super().__init__()
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


class _Batcher:
    """Decoded inputs in; batched predictions out, their writes handed to the pool.

    At most ``2 * n_workers`` writes are pending at a time; ``rows`` gets each input's
    summary row at its input index as its write finishes (or at once for a failed read).
    """

    def __init__(
        self,
        pool: Executor,
        bar: tqdm[Any],
        predictor: BasePredictor,
        files: Sequence[InputFile],
        ids: Sequence[str],
        out: Path,
        *,
        overlays: bool,
        batch_size: int,
        n_workers: int,
        dicom_out: Path | None = None,
        input_check: InputCheck | None = None,
    ) -> None:
        self._pool, self._bar, self._predictor = pool, bar, predictor
        self._files, self._ids, self._out, self._overlays = files, ids, out, overlays
        self._batch_size, self._n_workers = batch_size, n_workers
        self._dicom_out = dicom_out
        self._check = input_check
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
        self.rows[entry[0]] = entry[1].result()
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
            job = self._pool.submit(self._finish_one, i, r, stack[k : k + 1], part)
            self._writes.append((i, job))
            while len(self._writes) > 2 * max(self._n_workers, 1) + self._batch_size:
                self._finish(self._writes.popleft())

    def _finish_one(
        self, i: int, r: ReadResult, image: np.ndarray, raw: tuple[Any, ...]
    ) -> PredictRow:
        """One image after the network: its prediction, the input check, its outputs."""
        pred = self._predictor.finish(image, raw, [r.original_shape])[0]  # type: ignore[arg-type]
        verdict = None
        if self._check is not None:
            verdict = self._check.check(image[0], features=pred.features, tags=r.tags)
            if not verdict.accepted:
                logger.warning("%s: refused: %s", self._files[i].source, verdict.reason)
                return _write_refused(
                    self._out, self._ids[i], self._files[i], verdict, r, self._predictor
                )
        return _write_outputs(
            self._out,
            self._ids[i],
            self._files[i],
            pred,
            r,
            self._predictor,
            self._overlays,
            self._dicom_out,
            verdict,
        )


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
) -> list[PredictRow]:
    """Decode, predict and write every input; its summary rows, in input order.

    With ``dicom_out``, DICOM inputs also get an SR and a Secondary Capture there.
    """
    from tqdm.auto import tqdm

    size = predictor.image_size
    display = overlays or dicom_out is not None

    def read(item: InputFile) -> ReadResult:
        return read_input(
            item.path,
            size,
            display=display,
            keep_identifiers=keep_identifiers,
            check_tags=input_check is not None,
        )

    pool: Executor = ThreadPoolExecutor(n_workers) if n_workers > 1 else _InlineExecutor()
    with (
        _torch_threads(torch_threads),
        pool,
        tqdm(total=len(files), desc="predict", unit="img", disable=not progress) as bar,
    ):
        batcher = _Batcher(
            pool,
            bar,
            predictor,
            files,
            ids,
            out,
            overlays=overlays,
            batch_size=batch_size,
            n_workers=n_workers,
            dicom_out=dicom_out,
            input_check=input_check,
        )
        ahead = max(2 * batch_size, 2 * n_workers)
        try:
            for i, decoded in enumerate(_ordered(pool, read, files, ahead)):
                batcher.add(i, decoded)
            batcher.close()
        except KeyboardInterrupt:
            batcher.drain()  # records already being written are finished, then we stop
            raise PredictInterrupted(batcher.rows) from None
    return [r for r in batcher.rows if r is not None]
