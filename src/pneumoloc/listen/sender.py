"""Sending results to the destination AE with C-STORE (the listener as a storage SCU)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pneumoloc.listen.contexts import UNCOMPRESSED

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from pneumoloc.listen.config import Destination

logger = logging.getLogger("pneumoloc.listen")

__all__ = ["SendError", "send_datasets"]

_RESULT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)


class SendError(Exception):
    """The destination could not be reached, or did not store a result (says why)."""


def send_datasets(
    datasets: Sequence[Dataset], destination: Destination, *, calling_ae: str, timeout: float = 30
) -> None:
    """C-STORE ``datasets`` to ``destination`` on one association.

    Raises:
        SendError: The association was refused or aborted, or a C-STORE did not succeed
            (warnings, 0xB000-0xBFFF, count as stored).
    """
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in _RESULT_SOP_CLASSES:
        ae.add_requested_context(sop_class, [str(ts) for ts in UNCOMPRESSED])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise SendError(f"association with {destination} was not accepted")
    try:
        for ds in datasets:
            response = assoc.send_c_store(ds)
            code = int(getattr(response, "Status", -1)) if response else -1
            if code == -1:
                raise SendError(f"no C-STORE response from {destination} (timeout or abort)")
            if code != 0 and not 0xB000 <= code <= 0xBFFF:
                raise SendError(f"{destination} answered C-STORE with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
