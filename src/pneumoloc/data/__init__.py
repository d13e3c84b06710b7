"""Data sets: RSNA Kaggle layout, NORMAL/PNEUMONIA folders, synthetic data, cache and splits.

Data flows one way: ``io`` (reading files) -> ``data`` (indexes, cache, splits, datasets).
"""

from pneumoloc.data.records import DatasetIndex, XrayRecord

__all__ = ["DatasetIndex", "XrayRecord"]
