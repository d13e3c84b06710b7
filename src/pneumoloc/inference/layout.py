"""What a frontal chest film looks like at a glance, learnt from real films: its layout.

Three pieces of evidence of the input check that need no network (so they hold for every
backend and every checkpoint), each from a small thumbnail of the image:

* **orientation and polarity**: a logistic regression on 24 x 24 thumbnails (each standardised)
  that tells an upright film (or its mirror image) from the same film turned 90, 180 or 270
  degrees or with its grey levels inverted. Trained on the TRAINING splits of real films and
  on those transformations of them only (Gidaris et al. 2018 learn rotations the same way);
  its threshold is a low quantile of its score on the VALIDATION splits;
* **layout distance**: :class:`pneumoloc.inference.ood.OodModel` on the same thumbnails, one
  Gaussian per source, thresholds on the validation splits: photographs and other pictures
  that are not laid out like a chest film;
* **midline contrast**: on a frontal film the mediastinum and spine, down the middle, are
  brighter than the lung fields either side; a lateral view has its one lung field in the
  middle. (mean of the central band - mean of the two lateral bands) / standard deviation,
  refused below a low quantile of the training films' values.

:func:`fit_layout_model` fits them (``tools/fit_input_check.py``); the fitted model ships as
``pneumoloc/weights/frontal_layout.safetensors`` (arrays and JSON, read with numpy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoloc.errors import CheckpointError
from pneumoloc.inference.ood import OodModel, fit_ood_model
from pneumoloc.io.payload import load_payload, save_payload
from pneumoloc.io.preprocess import resize_square

__all__ = [
    "LAYOUT_MODEL_PATH",
    "LayoutModel",
    "fit_layout_model",
    "midline_contrast",
    "thumbnail",
]

LAYOUT_KIND = "pneumoloc-frontal-layout"
LAYOUT_FORMAT = 1
THUMBNAIL = 24
LAYOUT_MODEL_PATH = (
    Path(__file__).resolve().parent.parent / "weights" / "frontal_layout.safetensors"
)
_MIDLINE_SIZE = 128


def thumbnail(pixels: np.ndarray, side: int = THUMBNAIL) -> np.ndarray:
    """The image as a standardised ``side`` x ``side`` thumbnail, flattened (float32)."""
    small = resize_square(np.asarray(pixels, np.uint8), side).astype(np.float32)
    return ((small - small.mean()) / (small.std() + 1e-3)).ravel()


def midline_contrast(pixels: np.ndarray) -> float:
    """How much brighter the middle band is than the bands either side, in standard deviations.

    Columns are averaged over the rows from 25% to 70% of the height (the lung fields); the
    middle band is 45-55% of the width, the lateral bands 17-35% and 65-83%.
    """
    x = resize_square(np.asarray(pixels, np.uint8), _MIDLINE_SIZE).astype(np.float32)
    std = float(x.std())
    if std == 0:
        return 0.0
    s = _MIDLINE_SIZE
    profile = x[round(0.25 * s) : round(0.7 * s)].mean(axis=0)
    centre = profile[round(0.45 * s) : round(0.55 * s)].mean()
    sides = (
        profile[round(0.17 * s) : round(0.35 * s)].mean()
        + profile[round(0.65 * s) : round(0.83 * s)].mean()
    ) / 2
    return float((centre - sides) / std)


def _transformed(pixels: np.ndarray) -> list[np.ndarray]:
    """The non-upright versions of a film: turned a quarter, a half, three quarters; inverted."""
    return [np.rot90(pixels, 1), np.rot90(pixels, 2), np.rot90(pixels, 3), 255 - pixels]


@dataclass(frozen=True)
class LayoutModel:
    """The fitted layout evidence (see the module docstring).

    Attributes:
        coef: (THUMBNAIL**2,) logistic-regression weights (upright = 1).
        intercept: Its bias.
        orientation_threshold: Upright probabilities below it are refused.
        layout: Thumbnail Gaussians per source (score above 1: refused).
        midline_threshold: Midline contrasts below it are refused.
        info: How it was fitted.
    """

    coef: np.ndarray
    intercept: float
    orientation_threshold: float
    layout: OodModel
    midline_threshold: float
    info: dict[str, Any]

    def upright_probability(self, thumbs: np.ndarray) -> np.ndarray:
        """P(upright, not inverted) for thumbnails (B, THUMBNAIL**2)."""
        z = np.asarray(thumbs, np.float64) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def evidence(self, pixels: np.ndarray) -> dict[str, float]:
        """The three numbers of one uint8 image (H, W)."""
        thumb = thumbnail(pixels)[None]
        return {
            "upright_probability": float(self.upright_probability(thumb)[0]),
            "layout_score": float(self.layout.score(thumb)[0]),
            "midline_contrast": midline_contrast(pixels),
        }

    def reasons(self, evidence: Mapping[str, float]) -> list[str]:
        """Why :meth:`evidence` refuses the image (empty: it does not)."""
        reasons = []
        if evidence["upright_probability"] < self.orientation_threshold:
            reasons.append(
                "the image looks turned (90 or 180 degrees) or inverted (black bones on white), "
                "not an upright frontal chest film"
            )
        if evidence["midline_contrast"] < self.midline_threshold:
            reasons.append(
                "no bright mediastinum between two darker lung fields: not a frontal chest film "
                "(a lateral view, another body part, or not a radiograph)"
            )
        if evidence["layout_score"] > 1.0:
            reasons.append("the image is not laid out like a chest film (lungs, heart, abdomen)")
        return reasons

    def to_payload(self) -> dict[str, Any]:
        """A dict of numbers, strings and float32 arrays (:func:`pneumoloc.io.payload`)."""
        return {
            "kind": LAYOUT_KIND,
            "format": LAYOUT_FORMAT,
            "thumbnail": THUMBNAIL,
            "coef": self.coef.astype(np.float32),
            "intercept": float(self.intercept),
            "orientation_threshold": float(self.orientation_threshold),
            "layout": self.layout.to_payload(),
            "midline_threshold": float(self.midline_threshold),
            "info": self.info,
        }

    def save(self, path: str | Path = LAYOUT_MODEL_PATH) -> Path:
        """Write atomically."""
        return save_payload(path, self.to_payload())

    @classmethod
    def load(cls, path: str | Path = LAYOUT_MODEL_PATH) -> LayoutModel:
        """Read a saved model.

        Raises:
            CheckpointError: Missing, unreadable or not a layout model of this version.
        """
        path = Path(path)
        try:
            payload = load_payload(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: the frontal-film layout model is missing") from None
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable layout model ({exc})") from None
        if (
            not isinstance(payload, dict)
            or payload.get("kind") != LAYOUT_KIND
            or payload.get("format") != LAYOUT_FORMAT
            or payload.get("thumbnail") != THUMBNAIL
        ):
            raise CheckpointError(f"{path}: not a layout model this pneumoloc reads")
        coef = np.asarray(payload["coef"], np.float64)
        if coef.shape != (THUMBNAIL * THUMBNAIL,):
            raise CheckpointError(f"{path}: layout model of the wrong size")
        return cls(
            coef=coef,
            intercept=float(payload["intercept"]),
            orientation_threshold=float(payload["orientation_threshold"]),
            layout=OodModel.from_payload(payload["layout"], path),
            midline_threshold=float(payload["midline_threshold"]),
            info=dict(payload.get("info") or {}),
        )


def fit_layout_model(
    sources: Mapping[str, tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    *,
    quantile: float = 0.002,
    layout_quantile: float = 0.998,
    components: int = 32,
    seed: int = 0,
) -> LayoutModel:
    """Fit the layout evidence on real films.

    Args:
        sources: Per source, (training films, validation films), uint8 (H, W) each. Only the
            training films (and their turned and inverted versions) are learnt from; the
            validation films set the thresholds.
        quantile: Share of the validation films (all sources together) the orientation rule
            may refuse, and of each source's training films the midline rule may.
        layout_quantile: Quantile of each source's validation layout distances: its threshold.
        components: Principal directions of each source's thumbnail Gaussian.
        seed: Of the logistic regression's solver.
    """
    from sklearn.linear_model import LogisticRegression

    thumbs, labels, weights = [], [], []
    n_train = {name: len(train) for name, (train, _) in sources.items()}
    biggest = max(n_train.values())
    for name, (train, _) in sources.items():
        share = biggest / max(n_train[name], 1)  # each source weighs the same in the fit
        for film in train:
            film = np.asarray(film, np.uint8)
            for view in (film, film[:, ::-1]):  # a mirrored frontal film is still frontal
                thumbs.append(thumbnail(view))
                labels.append(1)
                weights.append(2.0 * share)  # as much weight as the four transformations
            for turned in _transformed(film):
                thumbs.append(thumbnail(turned))
                labels.append(0)
                weights.append(share)
    clf = LogisticRegression(C=0.1, max_iter=5000, random_state=seed)
    clf.fit(np.stack(thumbs), np.asarray(labels), sample_weight=np.asarray(weights))
    coef, intercept = clf.coef_[0].astype(np.float64), float(clf.intercept_[0])

    def upright_scores(films: Sequence[np.ndarray]) -> np.ndarray:
        t = np.stack([thumbnail(f) for f in films])
        return 1.0 / (1.0 + np.exp(-(t @ coef + intercept)))

    # all sources' validation films together: one source's few films would let its single
    # lowest score set the threshold
    val_upright = np.concatenate([upright_scores(val) for _, val in sources.values()])
    orientation_threshold = float(np.quantile(val_upright, quantile))
    midline = {
        name: np.array([midline_contrast(f) for f in train]) for name, (train, _) in sources.items()
    }
    midline_threshold = min(float(np.quantile(v, quantile)) for v in midline.values())
    layout = fit_ood_model(
        {
            name: (
                np.stack([thumbnail(f) for f in train]),
                np.stack([thumbnail(f) for f in val]),
            )
            for name, (train, val) in sources.items()
        },
        weights_sha256="",
        components=components,
        quantile=layout_quantile,
        margin=1.0,
        info={"features": f"standardised {THUMBNAIL} x {THUMBNAIL} thumbnails"},
    )
    info = {
        "sources": {
            name: {"n_train": len(train), "n_val": len(val)}
            for name, (train, val) in sources.items()
        },
        "quantile": quantile,
        "layout_quantile": layout_quantile,
    }
    return LayoutModel(
        coef=coef,
        intercept=intercept,
        orientation_threshold=orientation_threshold,
        layout=layout,
        midline_threshold=midline_threshold,
        info=info,
    )
