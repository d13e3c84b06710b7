"""How far an image is from real films: Mahalanobis distances to each source's films.

Used twice by the input check (:mod:`pneumoloc.inference.input_check`): on the classifier's
pooled features (the mean over locations of the feature map its head reads,
``CamClassifier.forward_features``), and on a small thumbnail of the image itself (its layout:
where lungs, mediastinum and abdomen are). For each source of real training films (adults'
RSNA films and children's Kermany films differ) the features are summarised by their mean and
their covariance, kept as its leading principal components plus one variance for the rest
(probabilistic PCA, Tipping & Bishop 1999), so the statistics stay small and well conditioned
with a few hundred films. The distance of a new image to a source is

    d^2 = sum_k (u_k . (f - mean))^2 / var_k + |residual|^2 / var_rest,   reported as sqrt(d^2 / C)

and compared with that source's threshold, set on HELD-OUT real films of the source (a
quantile of their distances, times a margin), never on the films it was fitted on (Lee et al.
2018, "A Simple Unified Framework for Detecting Out-of-Distribution Samples"). An image is out
of distribution when it is beyond the threshold of every source.

Statistics of network features belong to one set of weights: :class:`OodModel` stores the
SHA-256 of the weights it was fitted for, and :func:`load_ood_model` ignores (with a warning)
statistics of other weights, such as those of a re-issued default model. They live beside the
checkpoint in ``<checkpoint>.ood.safetensors`` (arrays and JSON, read with numpy: no pickle, no
torch, so the ONNX Runtime path reads them too), written by ``pneumoloc calibrate-ood``; the
``.ood.pt`` files of pneumoloc 0.1 are still read (with torch).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoloc.errors import CheckpointError
from pneumoloc.io.payload import load_payload, save_payload

logger = logging.getLogger(__name__)

__all__ = [
    "OOD_KIND",
    "Gaussian",
    "OodModel",
    "fit_gaussian",
    "fit_ood_model",
    "load_ood_model",
    "ood_path",
    "weights_digest",
]

OOD_KIND = "pneumoloc-ood"
OOD_FORMAT = 1
DEFAULT_COMPONENTS = 32
DEFAULT_QUANTILE = 0.998
DEFAULT_MARGIN = 1.0


def ood_path(checkpoint: str | Path) -> Path:
    """Where the statistics of a checkpoint (or of the ONNX file exported from it) live:
    ``best.pt`` -> ``best.ood.safetensors``."""
    path = Path(checkpoint)
    return path.with_name(path.stem + ".ood.safetensors")


def legacy_ood_path(checkpoint: str | Path) -> Path:
    """Where pneumoloc 0.1 wrote them (``best.ood.pt``, a ``torch.save`` file; still read)."""
    path = Path(checkpoint)
    return path.with_name(path.stem + ".ood.pt")


def weights_digest(state_dict: dict[str, Any]) -> str:
    """SHA-256 over a state dict's names, shapes, dtypes and values (device- and file-free)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Gaussian:
    """Mean and low-rank covariance of one source's features, and its distance threshold.

    Attributes:
        mean: (C,) feature mean.
        components: (K, C) leading principal directions (orthonormal rows).
        variances: (K,) variance along each.
        residual_variance: Mean variance of what the K directions leave.
        threshold: Distances above it are out of this source's distribution.
    """

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    threshold: float

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Normalised Mahalanobis distances (B,) of features (B, C)."""
        z = np.asarray(features, np.float64) - self.mean
        proj = z @ self.components.T
        inside = (proj**2 / self.variances).sum(axis=1)
        rest = np.maximum((z**2).sum(axis=1) - (proj**2).sum(axis=1), 0.0)
        return np.sqrt((inside + rest / self.residual_variance) / z.shape[1])

    def to_payload(self) -> dict[str, Any]:
        return {
            "mean": self.mean.astype(np.float32),
            "components": self.components.astype(np.float32),
            "variances": self.variances.astype(np.float32),
            "residual_variance": float(self.residual_variance),
            "threshold": float(self.threshold),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Gaussian:
        part = cls(
            mean=np.asarray(payload["mean"], np.float64),
            components=np.asarray(payload["components"], np.float64),
            variances=np.asarray(payload["variances"], np.float64),
            residual_variance=float(payload["residual_variance"]),
            threshold=float(payload["threshold"]),
        )
        c = part.mean.shape[0] if part.mean.ndim == 1 else -1
        if (
            c < 1
            or part.components.ndim != 2
            or part.components.shape[1] != c
            or part.variances.shape != (part.components.shape[0],)
            or not (part.variances > 0).all()
            or not part.residual_variance > 0
            or not (np.isfinite(part.threshold) and part.threshold > 0)
        ):
            raise ValueError("inconsistent arrays")
        return part


@dataclass(frozen=True)
class OodModel:
    """Real films' features, one :class:`Gaussian` per source (adults' and children's films
    differ: one Gaussian over both would be wide enough to take much that is neither).

    The score of an image is ``min over sources of distance / threshold``: above 1 it is out of
    distribution for every source.

    Attributes:
        parts: One per source.
        weights_sha256: The weights whose features these are (:func:`weights_digest`; "" for
            statistics of the image itself).
        info: How it was fitted (sources, counts, quantile, margin, held-out scores).
    """

    parts: tuple[Gaussian, ...]
    weights_sha256: str
    info: dict[str, Any]

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scores (B,) of features (B, C); above 1: out of distribution."""
        x = np.asarray(features, np.float64)
        return np.min([p.distance(x) / p.threshold for p in self.parts], axis=0)

    def to_payload(self) -> dict[str, Any]:
        """A dict of numbers, strings and float32 arrays (:func:`pneumoloc.io.payload`)."""
        return {
            "kind": OOD_KIND,
            "format": OOD_FORMAT,
            "parts": [p.to_payload() for p in self.parts],
            "weights_sha256": self.weights_sha256,
            "info": self.info,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], source: str | Path = "ood") -> OodModel:
        """Rebuild from :meth:`to_payload`'s dict.

        Raises:
            CheckpointError: Not OOD statistics pneumoloc wrote, or inconsistent arrays.
        """
        if not isinstance(payload, dict) or payload.get("kind") != OOD_KIND:
            raise CheckpointError(f"{source}: not pneumoloc OOD statistics")
        if payload.get("format") != OOD_FORMAT:
            raise CheckpointError(f"{source}: OOD statistics format {payload.get('format')}")
        try:
            parts = tuple(Gaussian.from_payload(p) for p in payload["parts"])
            dims = {p.mean.shape[0] for p in parts}
            if not parts or len(dims) != 1:
                raise ValueError("no parts, or parts of different sizes")
            return cls(
                parts=parts,
                weights_sha256=str(payload["weights_sha256"]),
                info=dict(payload.get("info") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: inconsistent OOD statistics ({exc})") from None

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path``."""
        return save_payload(path, self.to_payload())


def fit_gaussian(
    fit_features: np.ndarray,
    heldout_features: np.ndarray,
    *,
    components: int = DEFAULT_COMPONENTS,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
) -> tuple[Gaussian, dict[str, Any]]:
    """One source's :class:`Gaussian`, fitted on ``fit_features``, its threshold ``margin``
    times the ``quantile`` distance of ``heldout_features`` (other films of that source).

    Raises:
        ValueError: Too few films (fewer than 10 to fit, or none held out).
    """
    fit = np.asarray(fit_features, np.float64)
    held = np.asarray(heldout_features, np.float64)
    if fit.ndim != 2 or len(fit) < 10:
        raise ValueError(f"need at least 10 films to fit the statistics, got {len(fit)}")
    if held.ndim != 2 or len(held) == 0:
        raise ValueError("need held-out films to set the threshold")
    mean = fit.mean(axis=0)
    _, s, vt = np.linalg.svd(fit - mean, full_matrices=False)
    eig = s**2 / max(len(fit) - 1, 1)
    k = int(min(components, len(fit) - 1, fit.shape[1] - 1, int((eig > 1e-12).sum())))
    k = max(k, 1)
    total = float(eig.sum())
    floor = 1e-6 * total / fit.shape[1] + 1e-12
    rest = (total - float(eig[:k].sum())) / max(fit.shape[1] - k, 1)
    part = Gaussian(mean, vt[:k], np.maximum(eig[:k], floor), max(rest, floor), 1.0)
    held_d = part.distance(held)
    threshold = float(np.quantile(held_d, quantile) * margin)
    part = Gaussian(part.mean, part.components, part.variances, part.residual_variance, threshold)
    facts = {
        "n_fit": len(fit),
        "n_heldout": len(held),
        "components": k,
        "threshold": threshold,
        "heldout_refused_fraction": float((held_d > threshold).mean()),
    }
    return part, facts


def fit_ood_model(
    sources: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    weights_sha256: str,
    components: int = DEFAULT_COMPONENTS,
    quantile: float = DEFAULT_QUANTILE,
    margin: float = DEFAULT_MARGIN,
    info: dict[str, Any] | None = None,
) -> OodModel:
    """An :class:`OodModel` from ``{source name: (fit features, held-out features)}``.

    Args:
        sources: Per source, (N, C) features of real training films and (M, C) of other real
            films of the same source (its validation split), which set its threshold.
        weights_sha256: The weights the features came from.
        components: Principal directions kept per source.
        quantile: Of each source's held-out distances.
        margin: Factor on that quantile.
        info: Extra facts to store.
    """
    parts, facts = [], {}
    for name, (fit, held) in sources.items():
        part, fact = fit_gaussian(
            fit, held, components=components, quantile=quantile, margin=margin
        )
        parts.append(part)
        facts[name] = fact
    return OodModel(
        parts=tuple(parts),
        weights_sha256=weights_sha256,
        info={**(info or {}), "quantile": quantile, "margin": margin, "sources": facts},
    )


def read_ood_payload(path: str | Path) -> dict[str, Any]:
    """The payload of a statistics file: safetensors, or a legacy ``.ood.pt`` (needs torch)."""
    path = Path(path)
    if path.suffix == ".pt":
        import torch

        payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return payload
    return load_payload(path)


def load_ood_model(checkpoint: str | Path, weights_sha256: str) -> OodModel | None:
    """The OOD statistics stored beside ``checkpoint`` for exactly these weights, else None.

    Missing statistics are normal (None, quietly); statistics of other weights or an unreadable
    file give a warning and None: the input check then runs on image evidence alone.
    """
    path = ood_path(checkpoint)
    if not path.is_file() and legacy_ood_path(checkpoint).is_file():
        path = legacy_ood_path(checkpoint)
    if not path.is_file():
        return None
    try:
        model = OodModel.from_payload(read_ood_payload(path), path)
    except CheckpointError as exc:
        logger.warning("%s; the input check uses image evidence only", exc)
        return None
    except Exception as exc:
        logger.warning(
            "%s: unreadable OOD statistics (%s); the input check uses image evidence only",
            path,
            type(exc).__name__,
        )
        return None
    if model.weights_sha256 != weights_sha256:
        logger.warning(
            "%s: OOD statistics were fitted for other weights (the model was re-issued?); the "
            "input check uses image evidence only until `pneumoloc calibrate-ood` is re-run",
            path,
        )
        return None
    return model
