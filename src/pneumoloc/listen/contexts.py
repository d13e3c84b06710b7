"""What the listener accepts at association time: SOP classes and transfer syntaxes.

* The radiograph storage SOP classes it analyses (:data:`ANALYSED_SOP_CLASSES`: CR, DX for
  presentation and for processing, Secondary Capture, the class of the RSNA files) are
  accepted in every transfer syntax the reader decodes (:func:`image_transfer_syntaxes`):
  uncompressed, deflated (inflated with a bound by the reader), JPEG Baseline (the RSNA files;
  ``storescu -xy``), JPEG Extended and Lossless, JPEG-LS, JPEG 2000, HTJ2K and RLE, each only
  where its decoder is installed.
* Every other storage SOP class is accepted uncompressed only, so that its C-STORE reaches the
  listener and is answered 0x0122 (SOP class not supported) instead of failing the whole
  association; in a compressed syntax its presentation context is rejected ("transfer syntax
  not supported"), as is any analysed class in a syntax nothing here decodes.
* Verification (C-ECHO), for a PACS administrator's "test connection" button.
"""

from __future__ import annotations

from pydicom import uid

__all__ = ["ANALYSED_SOP_CLASSES", "UNCOMPRESSED", "image_transfer_syntaxes", "supported_contexts"]

ANALYSED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}
"""Storage SOP classes whose images are analysed (uid -> name)."""

UNCOMPRESSED = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)

_COMPRESSED = (
    uid.DeflatedExplicitVRLittleEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
)


def image_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes of analysed images: uncompressed and those with a decoder here."""
    from pydicom.pixels import get_decoder

    out = [str(ts) for ts in UNCOMPRESSED]
    for ts in _COMPRESSED:
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:
            available = False
        if available:
            out.append(str(ts))
    return out


def supported_contexts() -> list[tuple[str, list[str]]]:
    """(abstract syntax, transfer syntaxes) of every presentation context the listener accepts."""
    from pynetdicom import AllStoragePresentationContexts

    images = image_transfer_syntaxes()
    contexts: list[tuple[str, list[str]]] = [
        ("1.2.840.10008.1.1", [str(ts) for ts in UNCOMPRESSED])
    ]
    for context in AllStoragePresentationContexts:
        sop_class = str(context.abstract_syntax)
        if sop_class in ANALYSED_SOP_CLASSES:
            contexts.append((sop_class, images))
        else:
            contexts.append((sop_class, [str(ts) for ts in UNCOMPRESSED]))
    return contexts
