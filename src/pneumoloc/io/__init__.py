"""Reading X-ray files: one reader, one intensity convention, for every path."""

from pneumoloc.io.reader import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_SUFFIXES,
    XrayImage,
    is_supported_file,
    read_xray,
    read_xray_bytes,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "XrayImage",
    "is_supported_file",
    "read_xray",
    "read_xray_bytes",
]
