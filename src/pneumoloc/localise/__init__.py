"""From heatmaps to places: lung fields, heatmap refinement, boxes, and their geometry.

* :mod:`~pneumoloc.localise.geometry`: the one IoU, NMS, box conversions and Otsu threshold;
* :mod:`~pneumoloc.localise.lungs`: label-free lung masks;
* :mod:`~pneumoloc.localise.refine`: image-guided random-walk refinement of heatmaps;
* :mod:`~pneumoloc.localise.boxes`: heatmap (or detections) -> scored boxes;
* :mod:`~pneumoloc.localise.agreement`: label-free agreement of detector and CAM boxes.

Import the submodule you need. None of them imports torch (``refine`` is numpy since issue 15,
so the CPU inference path after the network needs none); ``geometry`` needs only numpy.
"""
