"""What the training commands share: configuration, augmentation, distributed set-up, the loop.

* :mod:`~pneumoloc.training.config`: :class:`TrainConfig` (YAML defaults, CLI overrides);
* :mod:`~pneumoloc.training.augment`: batched on-device augmentations (no boxes involved);
* :mod:`~pneumoloc.training.distributed`: torchrun / DDP process-group set-up;
* :mod:`~pneumoloc.training.state`: :class:`TrainState` (model, optimiser, schedule, progress)
  and its set-up;
* :mod:`~pneumoloc.training.loop`: the loss, the batches, one step and one epoch of training;
* :mod:`~pneumoloc.training.validation`: probabilities, metrics, the early-stopping value;
* :mod:`~pneumoloc.training.checkpointing`: checkpoint payloads and exact resume.
"""
