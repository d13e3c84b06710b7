"""The API's response models (they make ``/openapi.json`` meaningful) and OpenAPI extras."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pneumoloc import DISCLAIMER
from pneumoloc.serve.uploads import FILE_FIELD

__all__ = [
    "ERROR_RESPONSES",
    "LIMITS_TEXT",
    "UPLOAD_BODY",
    "BoxModel",
    "DisplayImages",
    "ErrorResponse",
    "Health",
    "InputInfo",
    "ModelCard",
    "ModelInfo",
    "PredictResponse",
]

LIMITS_TEXT = (
    "Research use only — not a diagnosis. Probability of pneumonia as estimated by the model; "
    "boxes show where the model's evidence is, not confirmed findings."
)


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of the API."""

    error: str = Field(description="Machine-readable code, e.g. 'not_an_image', 'too_large'.")
    detail: str = Field(description="What is wrong, in words a user can act on.")


class Health(BaseModel):
    """Liveness."""

    status: str = "ok"


class BoxModel(BaseModel):
    """A region where the model's evidence is; not a confirmed finding."""

    x: float = Field(description="Left edge, in pixels of the original image.")
    y: float = Field(description="Top edge, in pixels of the original image.")
    width: float
    height: float
    confidence: float = Field(description="Probability x mean heatmap inside the region.")


class ModelInfo(BaseModel):
    """What produces the predictions (``Predictor.describe()``)."""

    model_config = ConfigDict(protected_namespaces=(), extra="allow")

    model_id: str
    model: dict[str, Any] | None = None
    pneumoloc_version: str | None = None
    image_size: int
    threshold: float
    cam_method: str
    tta: bool
    box_config: dict[str, Any]
    checkpoint: str | None = Field(
        default=None, description="The checkpoint's file name (never a path on the server)."
    )


class ModelCard(ModelInfo):
    """``GET /api/model``: the model plus the key facts stored in its checkpoint."""

    metrics: dict[str, dict[str, float | int | str | None]] = Field(
        default_factory=dict, description="Scalar metrics per split, as stored at training time."
    )
    data: dict[str, Any] = Field(
        default_factory=dict,
        description="The training data: fingerprint, kind, sizes; a source by its last path "
        "component only.",
    )
    epoch: int | None = None
    label_names: list[str] | None = None
    disclaimer: str = DISCLAIMER
    limits: str = LIMITS_TEXT


class InputInfo(BaseModel):
    """Non-identifying facts about the uploaded file."""

    format: str = Field(description="'dicom', 'png' or 'jpeg' (detected from the content).")
    view_position: str | None = Field(default=None, description="DICOM ViewPosition, if any.")
    bytes: int


class DisplayImages(BaseModel):
    """What the page draws on its canvas; the boxes are drawn from ``boxes``."""

    xray_png_b64: str = Field(description="The X-ray as 8-bit grey PNG, downsized for display.")
    heatmap_png_b64: str = Field(
        description="The heatmap as an RGBA PNG at the model's input size: colour map 'inferno', "
        "alpha = heat, to be stretched over the whole X-ray."
    )
    width: int = Field(description="Width of the X-ray PNG.")
    height: int = Field(description="Height of the X-ray PNG.")


class PredictResponse(BaseModel):
    """``POST /api/predict``: the record ``pneumoloc predict`` writes, plus context."""

    model_config = ConfigDict(protected_namespaces=(), extra="allow")

    id: str = Field(description="The upload's file name, sanitised (never a DICOM tag).")
    probability: float = Field(ge=0.0, le=1.0, description="Of pneumonia, from the model.")
    decision: str = Field(description="'pneumonia' or 'no pneumonia' at the threshold.")
    threshold: float
    boxes: list[BoxModel]
    image_height: int
    image_width: int
    cam_method: str
    model_id: str
    model_version: str | None = None
    pneumoloc_version: str
    disclaimer: str
    limits: str = LIMITS_TEXT
    input: InputInfo
    model: ModelInfo
    images: DisplayImages | None = None


# The documented error answers of the API routes (``responses=`` of FastAPI).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Empty upload or malformed request."},
    401: {"model": ErrorResponse, "description": "Missing or wrong bearer token."},
    413: {"model": ErrorResponse, "description": "Upload or declared image size too large."},
    415: {"model": ErrorResponse, "description": "Not multipart, or not a DICOM/PNG/JPEG."},
    422: {"model": ErrorResponse, "description": "No pixel data, unsupported or corrupt image."},
}

# ``POST /api/predict`` reads its body itself (see uploads.py), so OpenAPI is told its shape.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {
                        FILE_FIELD: {
                            "type": "string",
                            "format": "binary",
                            "description": "One DICOM, PNG or JPEG chest X-ray.",
                        }
                    },
                }
            }
        },
    }
}
