"""What the training commands share: typed configuration, augmentation, distributed set-up.

* :mod:`~pneumoloc.training.config`: :class:`TrainConfig` (YAML defaults, CLI overrides);
* :mod:`~pneumoloc.training.augment`: batched on-device augmentations (no boxes involved);
* :mod:`~pneumoloc.training.distributed`: torchrun / DDP process-group set-up.
"""
