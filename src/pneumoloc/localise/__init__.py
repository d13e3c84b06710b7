"""From heatmaps to places: lung fields, heatmap refinement, boxes, and their geometry.

* :mod:`~pneumoloc.localise.geometry`: the one IoU, NMS, box conversions and Otsu threshold;
* :mod:`~pneumoloc.localise.lungs`: label-free lung masks;
* :mod:`~pneumoloc.localise.refine`: image-guided random-walk refinement of heatmaps;
* :mod:`~pneumoloc.localise.boxes`: heatmap (or detections) -> scored boxes.

Import the submodule you need: ``refine`` imports torch, ``boxes`` and ``geometry`` do not.
"""
