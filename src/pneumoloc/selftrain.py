"""Self-training: a box detector learnt from the classifier's own CAM boxes (pseudo-boxes).

No ground-truth box is used. The trained classifier draws boxes on the TRAINING images with its
inference recipe (CAM, lung mask, box rule); the images whose image-level label is positive
and whose probability is confident keep them as pseudo-boxes, labelled-negative images are
background-only examples, and a detector (torchvision's FCOS, a well-kept implementation of a
one-stage anchor-free detector) is trained on them. The detector sees whole images at once, so
it learns what an opacity box looks like across the data set rather than per image, which is
where CAM boxes are weakest (their extent). It can be iterated: round 2 trains on the boxes
of round 1. Self-training is bimodal over seeds (docs/localisation.md round 3h): some seeds'
detectors collapse to small boxes. ``candidates`` trains several seeds and keeps the one whose
boxes agree best with the teacher's on the validation images it flags (the median area ratio
of :mod:`pneumoloc.localise.agreement`; no label and no box of those images is read).
Unlabelled images (``--unlabelled``, e.g. the RSNA stage-2 test images) can add
pseudo-boxes too: those the classifier scores at least ``unlabelled_min_probability`` keep
their CAM boxes, those it scores at most 1 minus that join the background pool. The
labelled-positive check cannot apply to them, hence the stricter cut.

At inference the classifier still decides positive/negative; the detector only draws the
boxes of positive images (falling back to the CAM boxes when it finds none). Both travel in
one checkpoint (the classifier's, plus a ``"detector"`` entry).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pneumoloc._runtime import resolve_device
from pneumoloc.errors import ConfigError, DataError
from pneumoloc.inference.base import DETECTOR_MAX_BOXES, DETECTOR_MIN_SCORE
from pneumoloc.localise.agreement import BoxAgreement, box_agreement
from pneumoloc.localise.boxes import ScoredBoxes, detector_boxes
from pneumoloc.localise.geometry import xywh_to_xyxy
from pneumoloc.models.detector import (
    DETECTOR_BACKBONES,
    build_detector,
    detect,
    detector_input,
    detector_kind,
    init_detector_from_classifier,
)

if TYPE_CHECKING:
    from pneumoloc.data.cache import Cache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelfTrainConfig:
    """Settings of self-training.

    Attributes:
        epochs: Detector training epochs per round.
        batch_size: Images per step.
        lr: AdamW learning rate (cosine decay, no warm-up).
        min_probability: A labelled-positive training image gives pseudo-boxes only if the
            classifier's probability is at least this (and its decision threshold): confident
            CAMs only.
        negatives_per_positive: Labelled-negative images (no boxes) used per pseudo-boxed one.
        rounds: 1, or 2 to retrain on the first detector's boxes.
        unlabelled_min_probability: An unlabelled image (label -1) gives pseudo-boxes only if
            its probability is at least this (and the labelled cut), and is a background
            example only if its probability is at most 1 minus this (and under the decision
            threshold).
        min_score: Detector boxes below this score are dropped at inference.
        max_boxes: At most this many boxes per image.
        fpn_channels: Width of the feature pyramid (128 keeps it CPU-friendly).
        detector_backbone: One of ``DETECTOR_BACKBONES`` (``resnet18``, the first detector),
            or ``"auto"``: the classifier's own encoder when it is one of them (the
            EfficientNet-lite of the ImageNet-initialised classifiers), else resnet18.
        init_from_classifier: Start the detector's backbone from the classifier's encoder
            weights when the architectures match (for a classifier paired with a localiser:
            the classifier's, the member that gives the probability), else from scratch.
        seed: Seed of the detector's initialisation, negatives drawn and data order.
        candidates: Detectors to train, with seeds ``seed`` to ``seed + candidates - 1``; the
            one whose top boxes keep the largest median share of the teacher's CAM box area on
            the validation images the teacher flags is kept (labels and boxes of those images
            are not read). 1 (default): train ``seed`` only. Needs ``rounds`` 1.
        candidate_epochs: With ``candidates`` > 1, compare the candidates after this many
            epochs and train only the kept one on to ``epochs`` (its optimiser and schedule
            carry on: the same detector as training it in one go). None: compare fully
            trained candidates. (A seed's fate is set within two epochs: docs/localisation.md
            round 3i.)
        device: "auto", "cpu" or "cuda".
    """

    epochs: int = 12
    batch_size: int = 8
    lr: float = 5e-4
    min_probability: float = 0.5
    negatives_per_positive: float = 1.0
    rounds: int = 1
    unlabelled_min_probability: float = 0.7
    min_score: float = DETECTOR_MIN_SCORE
    max_boxes: int = DETECTOR_MAX_BOXES
    fpn_channels: int = 128
    detector_backbone: str = "resnet18"
    init_from_classifier: bool = True
    seed: int = 0
    candidates: int = 1
    candidate_epochs: int | None = None
    device: str = "auto"

    def validate(self) -> None:
        """Raise ConfigError for settings that cannot work."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (0 <= self.min_probability <= 1, "min_probability must be in [0, 1]"),
            (
                0.5 <= self.unlabelled_min_probability <= 1,
                "unlabelled_min_probability must be in [0.5, 1]",
            ),
            (self.negatives_per_positive >= 0, "negatives_per_positive must be >= 0"),
            (self.rounds in (1, 2), "rounds must be 1 or 2"),
            (self.candidates >= 1, "candidates must be >= 1"),
            (
                self.candidates == 1 or self.rounds == 1,
                "candidates > 1 needs rounds 1 (a seed is chosen once, after round 1)",
            ),
            (
                self.candidate_epochs is None or 1 <= self.candidate_epochs <= self.epochs,
                "candidate_epochs must be between 1 and epochs",
            ),
            (
                self.candidate_epochs is None or self.candidates > 1,
                "candidate_epochs needs candidates > 1",
            ),
            (self.max_boxes >= 1, "max_boxes must be >= 1"),
            (
                self.detector_backbone in ("auto", *DETECTOR_BACKBONES),
                f"detector_backbone must be auto or one of {', '.join(DETECTOR_BACKBONES)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"self-training: {message}")


@dataclass
class PseudoLabels:
    """Training targets made from the classifier, in input pixels (xyxy).

    Attributes:
        rows: Indices into the image array, positives (with boxes) first.
        boxes: One (N_i, 4) float32 xyxy array per row (empty for negatives).
        n_positive: Rows with pseudo-boxes.
    """

    rows: np.ndarray
    boxes: list[np.ndarray]
    n_positive: int


def make_pseudo_labels(
    labels: np.ndarray,
    probs: np.ndarray,
    drawn: Sequence[ScoredBoxes],
    *,
    threshold: float,
    config: SelfTrainConfig,
) -> PseudoLabels:
    """Pseudo-boxes for labelled-positive confident images, background for negatives.

    Args:
        labels: Image-level labels (N,) of the training images (no box is read); -1 for an
            unlabelled image (kept on the classifier's word alone, with the stricter
            ``config.unlabelled_min_probability``).
        probs: The classifier's probabilities (N,).
        drawn: Boxes in input pixels per image (the CAM's, or a detector's in round 2).
        threshold: The classifier's decision threshold.
        config: Self-training settings.
    """
    keep_prob = max(threshold, config.min_probability)
    keep_unlabelled = max(keep_prob, config.unlabelled_min_probability)
    positives = [
        i
        for i in range(len(labels))
        if len(drawn[i]) > 0
        and (
            (labels[i] == 1 and probs[i] >= keep_prob)
            or (labels[i] == -1 and probs[i] >= keep_unlabelled)
        )
    ]
    background = min(threshold, 1.0 - config.unlabelled_min_probability)
    negatives = np.flatnonzero((labels == 0) | ((labels == -1) & (probs <= background)))
    rng = np.random.default_rng(config.seed)
    n_neg = min(len(negatives), math.ceil(config.negatives_per_positive * len(positives)))
    chosen_neg = rng.choice(negatives, size=n_neg, replace=False) if n_neg else np.zeros(0, int)
    boxes = [xywh_to_xyxy(drawn[i].boxes) for i in positives]
    boxes += [np.zeros((0, 4), np.float32) for _ in chosen_neg]
    rows = np.concatenate([np.asarray(positives, int), chosen_neg.astype(int)])
    return PseudoLabels(rows=rows, boxes=boxes, n_positive=len(positives))


class DetectorTrainer:
    """The detector's training, resumable: :meth:`run` trains some epochs and keeps the
    optimiser, the cosine schedule (over ``config.epochs``) and the data-order generator, so
    ``run(2)`` then ``run(config.epochs - 2)`` trains exactly as ``run(config.epochs)``.

    Images get a random horizontal flip (pneumonia appears in either lung; the boxes follow).

    Raises:
        DataError: No pseudo-boxed image.
    """

    def __init__(
        self,
        detector: nn.Module,
        images: np.ndarray,
        pseudo: PseudoLabels,
        config: SelfTrainConfig,
        *,
        device: torch.device,
    ) -> None:
        if pseudo.n_positive == 0:
            raise DataError(
                "self-training: no confident positive training image gave a CAM box "
                f"(probability >= {config.min_probability}); nothing to learn boxes from"
            )
        self.detector, self.images, self.pseudo, self.config = detector, images, pseudo, config
        self.device = device
        detector.to(device).train()
        self.optimizer = torch.optim.AdamW(detector.parameters(), lr=config.lr, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(pseudo.rows) / config.batch_size)
        total = steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.history: list[float] = []

    def run(self, epochs: int) -> list[float]:
        """Train ``epochs`` more epochs (at most up to ``config.epochs``); returns the mean
        loss of every epoch so far. The detector is left in eval mode."""
        detector, pseudo, config, device = self.detector, self.pseudo, self.config, self.device
        size = self.images.shape[-1]
        detector.train()
        for _ in range(min(epochs, config.epochs - len(self.history))):
            order = torch.randperm(len(pseudo.rows), generator=self.generator).tolist()
            losses = []
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                batch = torch.as_tensor(self.images[pseudo.rows[idx]]).to(device)
                flips = torch.rand(len(idx), generator=self.generator) < 0.5
                targets = []
                for j, k in enumerate(idx):
                    boxes = torch.as_tensor(pseudo.boxes[k], dtype=torch.float32).reshape(-1, 4)
                    if flips[j]:
                        boxes = torch.stack(
                            [size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]],
                            dim=1,
                        )
                    targets.append(
                        {
                            "boxes": boxes.to(device),
                            "labels": torch.ones(len(boxes), dtype=torch.int64, device=device),
                        }
                    )
                batch = torch.where(flips.to(device)[:, None, None], batch.flip(-1), batch)
                loss_dict = detector(detector_input(batch), targets)
                loss = sum(loss_dict.values())
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[union-attr]
                torch.nn.utils.clip_grad_norm_(detector.parameters(), 10.0)
                self.optimizer.step()
                self.scheduler.step()
                losses.append(float(loss.detach()))  # type: ignore[union-attr]
            self.history.append(float(np.mean(losses)))
            logger.info("self-training epoch %d: loss %.4f", len(self.history), self.history[-1])
        detector.eval()
        return list(self.history)


def train_detector(
    detector: nn.Module,
    images: np.ndarray,
    pseudo: PseudoLabels,
    config: SelfTrainConfig,
    *,
    device: torch.device,
) -> list[float]:
    """Train the detector on pseudo-labels for ``config.epochs``; returns the mean loss of
    each epoch (:class:`DetectorTrainer` in one go)."""
    return DetectorTrainer(detector, images, pseudo, config, device=device).run(config.epochs)


@dataclass
class SelfTrainResult:
    """What :func:`self_train` did.

    Attributes:
        checkpoint: The written checkpoint (classifier + detector).
        n_pseudo_positive: Training images with pseudo-boxes (last round).
        n_negative: Background-only training images (last round).
        losses: Mean loss per epoch, per round.
        seconds: Wall time.
        round_checkpoints: One checkpoint per round, the last being ``checkpoint`` (earlier
            rounds are written beside it as ``<stem>.round<k>.pt``).
        n_from_unlabelled: Of the pseudo-labelled images (last round), how many are
            unlabelled images.
        selection: With ``candidates`` > 1, the checkpoint's ``detector["selection"]``
            record (each seed's agreement and the seed kept); else None.
    """

    checkpoint: Path
    n_pseudo_positive: int
    n_negative: int
    losses: list[list[float]]
    seconds: float
    round_checkpoints: list[Path]
    n_from_unlabelled: int = 0
    selection: dict[str, Any] | None = None


def _classifier_member(predictor: Any) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a loaded torch predictor that gives the probability (the classifier of
    a classifier + localiser pair, the first member of a plain ensemble, or the one model) and
    its model spec."""
    from pneumoloc.models.checkpoint import member_roles

    meta = predictor.meta
    if not predictor.members:
        return predictor.model, dict(meta["model"])
    roles = member_roles(meta)
    k = next((i for i, r in enumerate(roles) if r != "heatmap"), 0)
    return predictor.members[k], dict(meta["members"][k]["model"])


def _check_size(cache: Cache, where: str | Path, size: int) -> None:
    """Refuse a cache whose images are not ``size`` px (the classifier's input)."""
    if cache.images.shape[-1] != size:
        raise ConfigError(
            f"{where}: cached at {cache.images.shape[-1]} px, the classifier expects {size} px"
        )


def _open_unlabelled(path: str | Path, labelled: Cache, size: int) -> Cache:
    """The unlabelled cache at ``path``, checked: unlabelled kind, same size, and no image of
    ``labelled``'s validation or test split."""
    from pneumoloc.data.cache import open_cache
    from pneumoloc.training.pseudo import check_disjoint

    cache = open_cache(path)
    if cache.manifest.get("kind") != "unlabelled":
        raise DataError(
            f"{cache.root}: not an unlabelled cache (make one with prepare --unlabelled)"
        )
    _check_size(cache, cache.root, size)
    check_disjoint(cache, [labelled])
    return cache


def self_train(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    config: SelfTrainConfig | None = None,
    *,
    unlabelled: str | Path | None = None,
) -> SelfTrainResult:
    """Train a detector on the classifier's pseudo-boxes of the training split; write a
    checkpoint with both (``out``, a file path; with 2 rounds round 1's is kept beside it).

    Only the training split's images and image-level labels are read; boxes of the data set
    are never opened. ``unlabelled``: an unlabelled cache (``prepare --unlabelled``) whose
    confident images join the pseudo-labels (refused if it holds a validation or test image
    of ``data``).

    Raises:
        ConfigError: Bad settings. DataError: No pseudo-boxes. CheckpointError, CacheError.
    """
    from pneumoloc.data.cache import open_cache
    from pneumoloc.inference import Predictor
    from pneumoloc.models.checkpoint import load_checkpoint, save_checkpoint

    config = config or SelfTrainConfig()
    config.validate()
    started = time.perf_counter()
    device = resolve_device(config.device)
    predictor = Predictor.from_checkpoint(checkpoint, device=str(device))
    cache = open_cache(data)
    size = predictor.image_size
    _check_size(cache, data, size)
    rows = cache.split.part("train")
    images = np.asarray(cache.images[rows])
    labels = np.asarray(cache.labels[rows]).astype(np.int64)
    n_unlabelled = 0
    if unlabelled is not None:
        extra = _open_unlabelled(unlabelled, cache, size)
        images = np.concatenate([images, np.asarray(extra.images[extra.split.part("all")])])
        n_unlabelled = len(images) - len(rows)
        labels = np.concatenate([labels, np.full(n_unlabelled, -1, np.int64)])

    def cam_boxes(batch: np.ndarray) -> tuple[np.ndarray, list[ScoredBoxes]]:
        predictions = predictor.predict_arrays(batch, [(size, size)] * len(batch))
        return np.array([p.probability for p in predictions]), [p.boxes for p in predictions]

    encoder = _classifier_member(predictor)
    backbone = config.detector_backbone
    if backbone == "auto":
        name = str(encoder[1]["name"])
        backbone = name if name in DETECTOR_BACKBONES else "resnet18"

    fpn_channels, from_classifier = config.fpn_channels, config.init_from_classifier

    def new_detector(seed: int) -> tuple[nn.Module, int]:
        torch.manual_seed(seed)
        made = build_detector(size, fpn_channels, backbone)
        n = init_detector_from_classifier(made, encoder[0]) if from_classifier else 0
        return made, n

    detector, copied = new_detector(config.seed)
    logger.info(
        "detector: FCOS on %s, %s",
        backbone,
        f"{copied} tensors from the classifier" if copied else "from scratch",
    )
    # The classifier's pass over the training images, once for every round.
    probs, cam = cam_boxes(images)
    drawn = cam
    selection: dict[str, Any] | None = None
    if config.candidates > 1:
        detector, config, selection, chosen_losses = _choose_seed(
            new_detector, detector, images, labels, probs, cam, cache, predictor, config, device
        )
    payload = load_checkpoint(checkpoint)
    out_path = Path(out)
    written: list[Path] = []
    losses = []
    pseudo = None
    for round_ in range(config.rounds):
        pseudo = make_pseudo_labels(
            labels, probs, drawn, threshold=predictor.threshold, config=config
        )
        from_unlabelled = int(np.sum(labels[pseudo.rows] == -1))
        logger.info(
            "round %d: %d pseudo-boxed positives, %d negatives (%d of them unlabelled images)",
            round_ + 1,
            pseudo.n_positive,
            len(pseudo.rows) - pseudo.n_positive,
            from_unlabelled,
        )
        if selection is not None:  # trained (and chosen) above
            losses.append(chosen_losses)
        else:
            losses.append(train_detector(detector, images, pseudo, config, device=device))
        if round_ + 1 < config.rounds:
            # Next round's pseudo-boxes: this detector's boxes scoring >= 0.3, else the CAM's.
            detections = detect(detector, images, min_score=0.3, max_boxes=config.max_boxes)
            drawn = detector_boxes(
                detections,
                probs,
                threshold=0.0,
                input_size=size,
                out_shapes=[(size, size)] * len(images),
                fallback=cam,
            )
        last = round_ + 1 == config.rounds
        path = out_path if last else out_path.with_name(f"{out_path.stem}.round{round_ + 1}.pt")
        payload["detector"] = {
            "kind": detector_kind(backbone),
            "backbone": backbone,
            "image_size": size,
            "fpn_channels": config.fpn_channels,
            "state_dict": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
            "config": {**asdict(config), "rounds": round_ + 1},
            "n_pseudo_positive": pseudo.n_positive,
            "n_unlabelled": n_unlabelled,
            "n_from_unlabelled": from_unlabelled,
            "initialised_from_classifier": copied > 0,
            "selection": selection,
            "note": "trained on CAM pseudo-boxes of the training split; no ground-truth box used",
        }
        save_checkpoint(path, payload)
        written.append(path)
    assert pseudo is not None
    return SelfTrainResult(
        checkpoint=out_path,
        n_pseudo_positive=pseudo.n_positive,
        n_negative=len(pseudo.rows) - pseudo.n_positive,
        losses=losses,
        seconds=time.perf_counter() - started,
        round_checkpoints=written,
        n_from_unlabelled=from_unlabelled,
        selection=selection,
    )


def agreement_reference(predictor: Any, images: np.ndarray) -> tuple[list[int], list[np.ndarray]]:
    """What a detector's boxes are compared with, label-free: the indices of ``images`` (uint8,
    at the predictor's size) that the teacher flags and boxes, and its boxes there (xyxy,
    input pixels)."""
    size = images.shape[-1]
    teacher = predictor.predict_arrays(images, [(size, size)] * len(images))
    flagged = [i for i, p in enumerate(teacher) if p.positive and len(p.boxes)]
    return flagged, [xywh_to_xyxy(teacher[i].boxes.boxes) for i in flagged]


def detector_agreement(
    detector: nn.Module,
    images: np.ndarray,
    reference: Sequence[np.ndarray],
    *,
    min_score: float = DETECTOR_MIN_SCORE,
    max_boxes: int = DETECTOR_MAX_BOXES,
) -> BoxAgreement:
    """:func:`~pneumoloc.localise.agreement.box_agreement` of the detector's boxes on
    ``images`` with ``reference`` (one xyxy array per image, e.g. from
    :func:`agreement_reference`)."""
    found = detect(detector, images, min_score=min_score, max_boxes=max_boxes)
    return box_agreement([boxes for boxes, _ in found], reference)


def _choose_seed(
    new_detector: Any,
    first: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    cam: Sequence[ScoredBoxes],
    cache: Cache,
    predictor: Any,
    config: SelfTrainConfig,
    device: torch.device,
) -> tuple[nn.Module, SelfTrainConfig, dict[str, Any], list[float]]:
    """Train ``config.candidates`` detectors (seeds ``config.seed`` up) and keep the one whose
    top boxes agree best with the teacher's CAM boxes on the validation images it flags.

    Only the validation images' pixels are read (the teacher's predictions on them); their
    labels and boxes are not. Returns the kept detector, the config with its seed, the
    selection record and the kept detector's losses per epoch.
    """
    rows = cache.split.part("val")
    if not len(rows):
        raise DataError(
            f"{cache.root}: no validation image to choose among {config.candidates} detector seeds"
        )
    held = np.asarray(cache.images[rows])
    flagged, reference = agreement_reference(predictor, held)
    if not flagged:
        raise DataError(
            f"{cache.root}: the classifier flags no validation image with a box; "
            "nothing to compare the detector seeds with"
        )
    tried: list[dict[str, Any]] = []
    best: tuple[float, DetectorTrainer, SelfTrainConfig] | None = None
    compare_after = config.candidate_epochs or config.epochs
    for k in range(config.candidates):
        seeded = replace(config, seed=config.seed + k)
        detector = first if k == 0 else new_detector(seeded.seed)[0]
        pseudo = make_pseudo_labels(
            labels, probs, cam, threshold=predictor.threshold, config=seeded
        )
        trainer = DetectorTrainer(detector, images, pseudo, seeded, device=device)
        trainer.run(compare_after)
        agreement = detector_agreement(
            detector,
            held[flagged],
            reference,
            min_score=config.min_score,
            max_boxes=config.max_boxes,
        )
        tried.append({"seed": seeded.seed, **agreement.to_dict()})
        logger.info(
            "candidate seed %d: median area ratio %s, median IoU %s (%d of %d flagged "
            "validation images with a box)",
            seeded.seed,
            agreement.area_ratio_median,
            agreement.iou_median,
            agreement.n_with_detection,
            agreement.n_images,
        )
        if best is None or agreement.score > best[0]:
            best = (agreement.score, trainer, seeded)
        else:
            del trainer, detector
    assert best is not None
    _, trainer, chosen = best
    history = trainer.run(config.epochs - compare_after)  # nothing left when compared fully
    record = {
        "rule": (
            "highest median area ratio of the detector's top box to the teacher's largest CAM "
            "box, on the validation images the teacher flags (no label or box read)"
        ),
        "images": "val",
        "after_epochs": compare_after,
        "n_images": len(flagged),
        "candidates": tried,
        "selected_seed": chosen.seed,
    }
    logger.info(
        "kept seed %d of %d candidates (compared after %d epochs)",
        chosen.seed,
        config.candidates,
        compare_after,
    )
    return trainer.detector, chosen, record, history
