"""Self-training: a detector learnt from pseudo-boxes finds planted opacities; no truth box used."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoloc.errors import ConfigError, DataError
from pneumoloc.localise.agreement import box_agreement
from pneumoloc.localise.boxes import ScoredBoxes
from pneumoloc.localise.geometry import xyxy_to_xywh
from pneumoloc.metrics.localisation import iou_matrix
from pneumoloc.models import build_model
from pneumoloc.selftrain import (
    DetectorTrainer,
    SelfTrainConfig,
    build_detector,
    detect,
    detector_boxes,
    init_detector_from_classifier,
    make_pseudo_labels,
    train_detector,
)

S = 64


def opacity_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (n, S, S) noise; odd images carry a mid-grey square (xyxy truth), all images a
    brighter horizontal line (a distractor)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, S, S), dtype=np.uint8)
    labels = np.arange(n) % 2
    truth = np.zeros((n, 4), np.float32)
    for i in range(n):
        side = int(rng.integers(16, 26))
        y, x = rng.integers(2, S - side - 2, 2)
        line = (y + S // 2) % (S - 4)
        images[i, line : line + 2] = 250
        if labels[i]:
            images[i, y : y + side, x : x + side] = 170
            truth[i] = (x, y, x + side, y + side)
    return images, labels, truth


def iou_xyxy(a: np.ndarray, b: np.ndarray) -> float:
    """Best IoU of corner boxes (the detector's format; iou_matrix takes xywh)."""
    return float(iou_matrix(xyxy_to_xywh(a), xyxy_to_xywh(b)).max())


def test_detector_learns_planted_opacities_from_noisy_pseudo_boxes() -> None:
    """Pseudo-boxes are the truth with every edge moved at random by up to a fifth of the side
    (CAM boxes are that noisy); the detector, fitting all images at once, averages the noise
    out and finds the squares of new images (IoU > 0.5), which an untrained one does not.
    (A bias shared by all pseudo-boxes, e.g. all too small, is learnt too: only noise averages.)"""
    images, labels, truth = opacity_images(48, seed=0)
    rng = np.random.default_rng(1)

    def cam_like(batch: np.ndarray) -> tuple[np.ndarray, list[ScoredBoxes]]:
        out = []
        for i in range(len(batch)):
            if not labels[i]:
                out.append(ScoredBoxes())
                continue
            x0, y0, x1, y1 = truth[i] + rng.uniform(-0.2, 0.2, 4) * (truth[i][2] - truth[i][0])
            box = np.array([[x0, y0, x1 - x0, y1 - y0]])
            out.append(ScoredBoxes(boxes=box, scores=np.ones(1)))
        return np.where(labels == 1, 0.9, 0.1), out

    config = SelfTrainConfig(epochs=14, batch_size=8, lr=2e-3, fpn_channels=64, seed=0)
    pseudo = make_pseudo_labels(labels, *cam_like(images), threshold=0.5, config=config)
    assert pseudo.n_positive == 24 and len(pseudo.rows) == 48
    torch.manual_seed(0)
    detector = build_detector(S, fpn_channels=64)
    losses = train_detector(detector, images, pseudo, config, device=torch.device("cpu"))
    assert losses[-1] < 0.7 * losses[0]

    test_images, test_labels, test_truth = opacity_images(16, seed=5)
    found = detect(detector, test_images, min_score=0.05, max_boxes=1)
    ious = [
        iou_xyxy(boxes[:1], test_truth[i : i + 1]) if len(boxes) else 0.0
        for i, (boxes, _) in enumerate(found)
        if test_labels[i]
    ]
    assert np.mean(np.array(ious) > 0.5) >= 0.75, ious
    # Untrained, it finds nothing of the kind.
    torch.manual_seed(0)
    untrained = detect(build_detector(S, 64), test_images, min_score=0.05, max_boxes=1)
    raw = [
        iou_xyxy(b[:1], test_truth[i : i + 1]) if len(b) else 0.0
        for i, (b, _) in enumerate(untrained)
        if test_labels[i]
    ]
    assert np.mean(np.array(raw) > 0.5) < 0.5


def test_pseudo_labels_keep_confident_labelled_positives_only() -> None:
    images = np.zeros((6, S, S), np.uint8)
    labels = np.array([1, 1, 1, 0, 0, 0])
    box = ScoredBoxes(boxes=np.array([[4.0, 5.0, 10.0, 12.0]]), scores=np.ones(1))

    def draw(_: np.ndarray) -> tuple[np.ndarray, list[ScoredBoxes]]:
        # image 1 is not confident, image 2 has no CAM box, image 3 is negative with a box.
        return np.array([0.9, 0.3, 0.9, 0.9, 0.1, 0.1]), [box, box, ScoredBoxes(), box, box, box]

    pseudo = make_pseudo_labels(
        labels, *draw(images), threshold=0.2, config=SelfTrainConfig(min_probability=0.5)
    )
    assert pseudo.n_positive == 1 and pseudo.rows[0] == 0
    np.testing.assert_allclose(pseudo.boxes[0], [[4, 5, 14, 17]])  # xywh -> xyxy
    assert set(pseudo.rows[1:]) <= {3, 4, 5} and len(pseudo.rows) == 2
    assert all(len(b) == 0 for b in pseudo.boxes[1:])
    with pytest.raises(DataError, match="no confident positive"):
        empty = make_pseudo_labels(
            np.zeros(6, int), *draw(images), threshold=0.2, config=SelfTrainConfig()
        )
        train_detector(build_detector(S, 32), images, empty, SelfTrainConfig(), device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rounds"):
        SelfTrainConfig(rounds=3).validate()


def test_detector_boxes_are_gated_scaled_and_fall_back() -> None:
    dets = [
        (np.array([[8.0, 16.0, 24.0, 48.0]], np.float32), np.array([0.5], np.float32)),
        (np.zeros((0, 4), np.float32), np.zeros(0, np.float32)),
        (np.array([[0.0, 0.0, 8.0, 8.0]], np.float32), np.array([0.9], np.float32)),
    ]
    fallback = [ScoredBoxes(), ScoredBoxes(np.array([[1.0, 2, 3, 4]]), np.array([0.7])), None]
    out = detector_boxes(
        dets,
        np.array([0.8, 0.9, 0.1]),
        threshold=0.5,
        input_size=64,
        out_shapes=[(128, 256), (64, 64), (64, 64)],
        fallback=fallback,  # type: ignore[arg-type]
    )
    np.testing.assert_allclose(out[0].boxes, [[32, 32, 64, 64]])  # x*4, y*2
    assert out[0].scores[0] == pytest.approx(0.4)  # probability x detector score
    assert out[1] is fallback[1]  # positive, no detection: the CAM boxes
    assert len(out[2]) == 0  # negative image: no boxes


def test_detector_starts_from_a_resnet18_classifier() -> None:
    detector = build_detector(S, 32)
    classifier = build_model("resnet18")
    assert init_detector_from_classifier(detector, classifier) > 50
    body = detector.backbone.body  # type: ignore[union-attr]
    torch.testing.assert_close(
        body.layer3[0].conv1.weight, classifier.backbone.layer3[0].conv1.weight
    )
    torch.testing.assert_close(
        body.conv1.weight.sum(dim=1, keepdim=True), classifier.backbone.conv1.weight
    )
    assert init_detector_from_classifier(build_detector(S, 32), build_model("smallcamnet")) == 0


def test_an_efficientnet_detector_starts_from_the_classifier_and_round_trips() -> None:
    """The EfficientNet-lite detector's encoder takes every tensor of a tf_efficientnet_lite0
    classifier's encoder (a resnet18 detector takes none), and a stored one rebuilds to the
    same outputs; an unknown kind or backbone is refused."""
    from pneumoloc.errors import CheckpointError
    from pneumoloc.models.detector import detector_kind, load_detector

    classifier = build_model("tf_efficientnet_lite0")
    detector = build_detector(S, 32, "tf_efficientnet_lite0")
    body = detector.backbone.body  # type: ignore[union-attr]
    assert init_detector_from_classifier(detector, classifier) == len(body.state_dict())
    torch.testing.assert_close(
        body.blocks[3][0].conv_pw.weight, classifier.backbone.blocks[3][0].conv_pw.weight
    )
    assert init_detector_from_classifier(build_detector(S, 32), classifier) == 0
    entry = {
        "kind": detector_kind("tf_efficientnet_lite0"),
        "image_size": S,
        "fpn_channels": 32,
        "state_dict": detector.state_dict(),
    }
    images, _, _ = opacity_images(2, seed=0)
    torch.manual_seed(0)
    for (a, sa), (b, sb) in zip(
        detect(detector, images, min_score=0.0, max_boxes=2),
        detect(load_detector(entry), images, min_score=0.0, max_boxes=2),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-4)
        np.testing.assert_allclose(sa, sb, atol=1e-5)
    with pytest.raises(CheckpointError, match="unknown detector kind"):
        load_detector({**entry, "kind": "fcos-vgg-fpn"})
    with pytest.raises(CheckpointError, match="unknown detector backbone"):
        build_detector(S, 32, "vgg16")
    with pytest.raises(ConfigError, match="detector_backbone"):
        SelfTrainConfig(detector_backbone="vgg16").validate()


def test_a_pair_gives_its_classifier_to_the_detector() -> None:
    """For a classifier + localiser file (the shipped default), the detector's encoder comes
    from the member that gives the probability (average pooling), not the localiser."""
    from pneumoloc.inference import Predictor
    from pneumoloc.selftrain import _classifier_member

    _, spec = _classifier_member(Predictor.from_checkpoint(None, device="cpu"))
    assert spec["name"] == "tf_efficientnet_lite0" and spec["kwargs"]["pool"] == "avg"
    assert "decoder" not in spec["kwargs"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_detect_on_cuda() -> None:
    detector = build_detector(S, 32).cuda()
    images, _, _ = opacity_images(3, seed=0)
    out = detect(detector, torch.from_numpy(images).cuda(), min_score=0.0, max_boxes=2)
    assert len(out) == 3 and all(b.shape[1] == 4 and len(b) <= 2 for b, _ in out)


def test_selftrain_end_to_end_never_reads_boxes(synth_rsna: Path, tmp_path: Path) -> None:
    """CLI: classifier -> selftrain -> a checkpoint whose Predictor draws detector boxes.

    The data set's box file is destroyed first: self-training must not need it."""
    import shutil

    from pneumoloc.cli import main
    from pneumoloc.data.cache import prepare_cache
    from pneumoloc.inference import Predictor

    data = tmp_path / "data"
    shutil.copytree(synth_rsna, data)
    cache = prepare_cache(data, tmp_path / "cache", size=64, workers=1, progress=False).root
    for f in list(cache.glob("*box*")):
        f.write_text("not boxes")
    run = tmp_path / "run"
    argv = ["train", "--data", str(cache), "--out", str(run), "--model", "smallcamnet"]
    argv += ["--image-size", "64", "--epochs", "2", "--batch-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    out = tmp_path / "selftrained.pt"
    argv = ["selftrain", str(run / "best.pt"), "--data", str(cache), "--out", str(out)]
    argv += ["--epochs", "1", "--min-probability", "0", "--device", "cpu", "--rounds", "2"]
    assert main(argv) == 0
    assert (tmp_path / "selftrained.round1.pt").is_file()  # round 1 kept beside round 2
    predictor = Predictor.from_checkpoint(out, device="cpu", threshold_override=0.0)
    assert predictor.meta["detector"]["config"]["rounds"] == 2
    assert predictor.detector is not None
    assert predictor.describe()["box_source"] == "detector"
    assert "state_dict" not in predictor.meta["detector"]
    images = np.zeros((2, 64, 64), np.uint8)
    preds = predictor.predict_arrays(images, [(128, 128)] * 2)
    assert len(preds) == 2 and all(p.positive for p in preds)
    from pneumoloc.inference import prediction_record

    assert prediction_record(preds[0], predictor, image_id="x")["box_source"] == "detector"
    plain = Predictor.from_checkpoint(out, device="cpu", use_detector=False)
    assert plain.detector is None and plain.describe()["box_source"] == "cam"


def test_unlabelled_images_need_the_stricter_cut_on_both_sides() -> None:
    """Label -1: pseudo-boxes only at >= unlabelled_min_probability, background only at <= 1
    minus it; labelled images keep their own rule (the unlabelled rows change nothing there)."""
    labels = np.array([1, 0, -1, -1, -1, -1])
    probs = np.array([0.6, 0.1, 0.6, 0.9, 0.2, 0.4])
    box = ScoredBoxes(boxes=np.array([[4.0, 5.0, 10.0, 12.0]]), scores=np.ones(1))
    config = SelfTrainConfig(min_probability=0.5, negatives_per_positive=10)
    pseudo = make_pseudo_labels(labels, probs, [box] * 6, threshold=0.5, config=config)
    # image 2 (0.6) is under the unlabelled cut, image 3 (0.9) is over it
    assert pseudo.n_positive == 2 and list(pseudo.rows[:2]) == [0, 3]
    # background: the labelled negative and image 4 (0.2 <= 0.3); not image 5 (0.4)
    assert sorted(pseudo.rows[2:]) == [1, 4]
    labelled = make_pseudo_labels(labels[:2], probs[:2], [box] * 2, threshold=0.5, config=config)
    assert list(labelled.rows) == [0, 1]
    with pytest.raises(ConfigError, match="unlabelled_min_probability"):
        SelfTrainConfig(unlabelled_min_probability=0.4).validate()


def test_selftrain_takes_pseudo_boxes_from_an_unlabelled_cache(
    synth_rsna: Path, tmp_path: Path
) -> None:
    """CLI with --unlabelled: the detector's record counts the unlabelled images it used; a
    labelled cache given as unlabelled, or one holding a test image of the data, is refused."""
    import shutil

    from pneumoloc.cli import main
    from pneumoloc.data.cache import prepare_cache
    from pneumoloc.models.checkpoint import load_checkpoint

    cache = prepare_cache(synth_rsna, tmp_path / "cache", size=64, workers=1, progress=False)
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    train_rows = cache.split.part("train")
    for path in cache.table["path"].iloc[train_rows[:12]]:
        shutil.copy(path, folder / Path(path).name)
    extra = prepare_cache(
        folder, tmp_path / "extra", size=64, workers=1, progress=False, unlabelled=True
    ).root
    run = tmp_path / "run"
    argv = ["train", "--data", str(cache.root), "--out", str(run), "--model", "smallcamnet"]
    argv += ["--image-size", "64", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    out = tmp_path / "st.pt"
    argv = ["selftrain", str(run / "best.pt"), "--data", str(cache.root), "--out", str(out)]
    argv += ["--epochs", "1", "--min-probability", "0", "--device", "cpu"]
    assert main([*argv, "--unlabelled", str(extra), "--unlabelled-min-probability", "0.5"]) == 0
    record = load_checkpoint(out)["detector"]
    assert record["n_unlabelled"] == 12
    assert record["config"]["unlabelled_min_probability"] == 0.5
    # an untrained-for-one-epoch classifier still sits on one side of 0.5 for most images
    assert record["n_from_unlabelled"] > 0
    assert main([*argv, "--unlabelled", str(cache.root)]) == 2  # a labelled cache
    held = tmp_path / "held"
    held.mkdir()
    for path in cache.table["path"].iloc[cache.split.part("test")[:3]]:  # a cache needs 3
        shutil.copy(path, held)
    leaked = prepare_cache(
        held, tmp_path / "leak", size=64, workers=1, progress=False, unlabelled=True
    ).root
    assert main([*argv, "--unlabelled", str(leaked)]) == 2  # a test image of the data


def test_box_agreement_known_values() -> None:
    """Top box half the reference's area inside it: ratio 0.5, IoU 0.5; only the top box
    counts; images without a reference box are skipped; images without a detection count in
    n_images only."""
    ref = np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 24.0, 24.0]])  # largest: 100
    half = np.array([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 10.0]])  # second box ignored
    same = np.array([[0.0, 0.0, 10.0, 10.0]])
    out = box_agreement([half, same, np.zeros((0, 4)), same], [ref, ref, ref, np.zeros((0, 4))])
    assert out.n_images == 3 and out.n_with_detection == 2
    assert out.area_ratio_median == pytest.approx(0.75)  # median of 0.5 and 1.0
    assert out.iou_median == pytest.approx(0.75)
    assert box_agreement([half], [ref]).iou_median == pytest.approx(0.5)
    empty = box_agreement([np.zeros((0, 4))], [ref])
    assert empty.area_ratio_median is None and empty.score == -np.inf
    with pytest.raises(ValueError, match="2 detections for 1"):
        box_agreement([half, half], [ref])


def test_candidates_keep_the_seed_whose_boxes_keep_the_cam_area(
    synth_rsna: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--candidates 3: each seed is trained, compared on the flagged validation images and the
    one keeping the most CAM area is written (here seed 1 of 0-2: its detector draws the whole
    image, the others a 2-pixel box); a control without candidates keeps seed 0. Then the real
    trainer through the CLI: the record lists both seeds' agreement and the kept one."""
    from pneumoloc import selftrain as st
    from pneumoloc.cli import main
    from pneumoloc.data.cache import prepare_cache
    from pneumoloc.models.checkpoint import load_checkpoint

    cache = prepare_cache(synth_rsna, tmp_path / "cache", size=64, workers=1, progress=False)
    run = tmp_path / "run"
    argv = ["train", "--data", str(cache.root), "--out", str(run), "--model", "smallcamnet"]
    argv += ["--image-size", "64", "--epochs", "2", "--batch-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    teacher = run / "best.pt"

    real_run, real_detect = st.DetectorTrainer.run, st.detect
    seeds: dict[int, int] = {}
    runs: list[tuple[int, int]] = []

    def fake_run(self, epochs):  # type: ignore[no-untyped-def]
        seeds[id(self.detector)] = self.config.seed
        runs.append((self.config.seed, epochs))
        return [1.0] * epochs

    def fake_detect(detector, images, *, min_score, max_boxes):  # type: ignore[no-untyped-def]
        box = [0.0, 0.0, 64.0, 64.0] if seeds.get(id(detector)) == 1 else [0.0, 0.0, 2.0, 2.0]
        return [(np.array([box], np.float32), np.ones(1)) for _ in range(len(images))]

    monkeypatch.setattr(st.DetectorTrainer, "run", fake_run)
    monkeypatch.setattr(st, "detect", fake_detect)
    config = st.SelfTrainConfig(epochs=1, min_probability=0.0, candidates=3, device="cpu")
    chosen = st.self_train(teacher, cache.root, tmp_path / "c.pt", config)
    assert runs == [(0, 1), (1, 1), (2, 1), (1, 0)]  # compared fully trained: nothing after
    assert chosen.selection is not None
    assert [c["seed"] for c in chosen.selection["candidates"]] == [0, 1, 2]
    assert chosen.selection["selected_seed"] == 1
    ratios = [c["area_ratio_median"] for c in chosen.selection["candidates"]]
    assert ratios[1] > 1.0 > 0.5 > ratios[0] == ratios[2]
    record = load_checkpoint(tmp_path / "c.pt")["detector"]
    assert record["config"]["seed"] == 1 and record["selection"]["selected_seed"] == 1
    plain = st.self_train(teacher, cache.root, tmp_path / "p.pt", replace(config, candidates=1))
    assert plain.selection is None
    assert load_checkpoint(tmp_path / "p.pt")["detector"]["config"]["seed"] == 0
    # Compared after 1 of 3 epochs: only the kept seed trains on, for the 2 left.
    runs.clear()
    early = replace(config, epochs=3, candidate_epochs=1)
    picked = st.self_train(teacher, cache.root, tmp_path / "e.pt", early)
    assert picked.selection is not None and picked.selection["after_epochs"] == 1
    assert runs == [(0, 1), (1, 1), (2, 1), (1, 2)]
    for bad in (0, 4):
        with pytest.raises(ConfigError, match="candidate_epochs"):
            replace(early, candidate_epochs=bad).validate()
    with pytest.raises(ConfigError, match="needs candidates > 1"):
        replace(early, candidates=1).validate()

    monkeypatch.setattr(st.DetectorTrainer, "run", real_run)
    monkeypatch.setattr(st, "detect", real_detect)
    out = tmp_path / "st.pt"
    argv = ["selftrain", str(teacher), "--data", str(cache.root), "--out", str(out)]
    argv += ["--epochs", "1", "--min-probability", "0", "--device", "cpu", "--seed", "3"]
    assert main([*argv, "--candidates", "2", "--candidate-epochs", "1"]) == 0
    selection = load_checkpoint(out)["detector"]["selection"]
    assert selection["after_epochs"] == 1
    assert [c["seed"] for c in selection["candidates"]] == [3, 4]
    assert selection["selected_seed"] in (3, 4) and selection["n_images"] > 0
    assert main([*argv, "--candidates", "2", "--rounds", "2"]) == 2  # refused: rounds 1 only
    assert main([*argv, "--candidates", "0"]) == 2


def test_training_resumed_after_some_epochs_equals_training_in_one_go() -> None:
    """DetectorTrainer.run(1) then run(2) leaves the same weights and losses as 3 epochs at
    once (optimiser, schedule and data order carry on), what --candidate-epochs relies on; a
    fresh trainer for the last 2 epochs (schedule restarted) does not."""
    images, labels, truth = opacity_images(16, seed=0)
    boxes = [ScoredBoxes(np.array([[*t[:2], *(t[2:] - t[:2])]]), np.ones(1)) for t in truth]
    config = SelfTrainConfig(epochs=3, batch_size=8, lr=2e-3, fpn_channels=32, seed=0)
    pseudo = make_pseudo_labels(
        labels, np.where(labels == 1, 0.9, 0.1), boxes, threshold=0.5, config=config
    )
    cpu = torch.device("cpu")

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_detector(S, fpn_channels=32)

    whole = fresh()
    once = train_detector(whole, images, pseudo, config, device=cpu)
    split = fresh()
    trainer = DetectorTrainer(split, images, pseudo, config, device=cpu)
    assert len(trainer.run(1)) == 1
    assert trainer.run(2) == once
    assert trainer.run(5) == once  # no epoch past config.epochs
    for key, value in whole.state_dict().items():
        assert torch.equal(value, split.state_dict()[key]), key
    restarted = fresh()
    DetectorTrainer(restarted, images, pseudo, config, device=cpu).run(1)
    DetectorTrainer(restarted, images, pseudo, replace(config, epochs=2), device=cpu).run(2)
    assert any(not torch.equal(v, restarted.state_dict()[k]) for k, v in whole.state_dict().items())
