"""The API's errors: one exception, one JSON shape, one mapping from image-reading errors."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from pneumoloc.errors import (
    ImageReadError,
    ImageTooLargeError,
    NoPixelDataError,
    NotAChestRadiographError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

__all__ = ["ApiError", "api_error_from_read", "api_error_response"]


class ApiError(Exception):
    """An error answered as ``{"error": code, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


# (error class, HTTP status, code); the first match wins.
_READ_ERRORS: tuple[tuple[type[ImageReadError], int, str], ...] = (
    (ImageTooLargeError, 413, "image_too_large"),
    (NotAnImageError, 415, "not_an_image"),
    (NoPixelDataError, 422, "no_pixel_data"),
    (UnsupportedImageError, 422, "unsupported_image"),
    (TruncatedImageError, 422, "truncated_image"),
    (NotAChestRadiographError, 422, "not_a_chest_radiograph"),
)


def api_error_from_read(exc: ImageReadError) -> ApiError:
    """The API error (status and code) for an upload that could not be read as an X-ray."""
    for cls, status, code in _READ_ERRORS:
        if isinstance(exc, cls):
            return ApiError(status, code, str(exc))
    return ApiError(422, "unreadable_image", str(exc))


async def api_error_response(_: Request, exc: ApiError) -> JSONResponse:
    """The exception handler answering an :class:`ApiError` (401s name the Bearer scheme)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(
        {"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=headers
    )
