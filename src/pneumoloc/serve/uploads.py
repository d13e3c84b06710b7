"""Reading an upload: streamed from the request, size-limited, kept in memory (never on disk)."""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pneumoloc.data.records import safe_name
from pneumoloc.serve.errors import ApiError

__all__ = ["FILE_FIELD", "read_upload", "upload_name"]

FILE_FIELD = "file"
"""The multipart form field holding the uploaded X-ray."""

# Room for the multipart framing (boundaries, part headers) around the file itself.
_MULTIPART_OVERHEAD = 64 * 1024


def upload_name(filename: str | None) -> str:
    """A short, printable base name of an uploaded file (never used as a path).

    The part after the last ``/`` or ``\\``, cleaned by :func:`pneumoloc.data.records.safe_name`,
    at most 80 characters; "upload" when nothing is left.
    """
    base = re.split(r"[\\/]", filename or "")[-1]
    return safe_name(base, max_len=80, fallback="upload")


class _UploadCollector:
    """Callbacks of python-multipart's streaming parser that keep the ``file`` part in memory.

    Hand-written on the parser's callbacks (not Starlette's ``request.form()``) because that
    spools large files to a temporary file on disk and only limits non-file fields.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.filename: str | None = None
        self.found = False
        self.finished = False
        self._in_file = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._in_file = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        key = self._field.decode("latin-1").strip().lower()
        self._headers[key] = self._value.decode("latin-1")
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data":
            return
        if params.get(b"name", b"").decode("latin-1") != FILE_FIELD:
            return  # other form fields are ignored (never buffered)
        if self.found:
            raise ApiError(400, "bad_request", "upload one file at a time")
        self.found = True
        self._in_file = True
        raw_name = params.get(b"filename")
        self.filename = raw_name.decode("utf-8", "replace") if raw_name is not None else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file:
            return
        if len(self.data) + (end - start) > self.limit:
            raise _too_large(self.limit)
        self.data += data[start:end]

    def _part_end(self) -> None:
        self._in_file = False

    def _end(self) -> None:
        self.finished = True


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "too_large",
        f"the upload exceeds the limit of {_megabytes(limit)} (server setting --max-upload-mb)",
    )


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


async def read_upload(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The bytes and client file name of the ``file`` field, read with a size limit."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the image as multipart/form-data in a field named {FILE_FIELD!r}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "bad_request", "the multipart request has no boundary")
    body_limit = limit + _MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(limit)  # cheap early refusal; the stream is still counted below
    collector = _UploadCollector(limit)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise _too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "bad_request", f"malformed multipart body ({exc})") from None
    if not collector.found:
        raise ApiError(400, "bad_request", f"no file in the form field {FILE_FIELD!r}")
    if not collector.finished:
        raise ApiError(400, "bad_request", "the multipart body is incomplete")
    return bytes(collector.data), collector.filename
