"""``pneumoloc predict``: DICOM, PNG or JPEG files in; per image a JSON record and an overlay.

For every input image, under ``--out``:

* ``<id>.json``: :func:`pneumoloc.inference.prediction_record` (probability, decision at the
  model's threshold, boxes in ORIGINAL pixel coordinates with confidences, CAM method, model
  id and versions) plus the sanitised ``source`` and the ``backend``;
* ``<id>.png`` (unless ``overlays=False``): the X-ray with the heatmap and its colour scale,
  the boxes, the probability and the decision (:func:`pneumoloc.report.overlay.prediction_overlay`);

and one ``summary.csv`` for the run, one row per input in input order, with the columns of
:data:`SUMMARY_COLUMNS`. A file that cannot be read (corrupt, truncated, not an image,
unsupported) gets a ``failed`` row with the reason and no other output; the run goes on.

Output names never come from file content: ``<id>`` is the input's file name without its
suffix, passed through :func:`pneumoloc.data.records.safe_name` (letters, digits, ``._-``;
never ``..`` or hidden) and made unique in the run (``x``, ``x_2``, ``x_3``...,
case-insensitively). Every output is written through a temporary file in ``--out`` and moved
into place only when its resolved path is directly inside ``--out``.

Identifying DICOM values (patient name, id, birth date, UIDs, ...) are never read or written
unless ``keep_identifiers=True``; then the JSON record gets a ``dicom_identifiers`` block with
those of :data:`IDENTIFIER_KEYWORDS` that the file has. They are never logged.

Speed: files are decoded at reduced resolution (``read_xray(min_size=S)``) and resized to the
model's side ``S`` by a pool of threads (Pillow's decoders and resizers release the GIL, and a
decode takes ~2 ms per RSNA image, so threads avoid the seconds a process pool takes to start),
which also renders and writes the outputs, while the calling thread runs the model in batches
(on the GPU when ``device="auto"`` finds one).

Folders are searched recursively for files with a supported suffix (``.dcm``, ``.dicom``,
``.png``, ``.jpg``, ``.jpeg``, any case), skipping symbolic links to folders and ``--out``
itself, and hidden files and folders (with a warning; ``prepare`` follows the same rule,
:mod:`pneumoloc.data.files`); a broken link or a link loop gets a failed row saying so, and a
folder named like an image is reported. Files named on the command line are always tried
(the format is detected from the content).

Before any probability is given, each image goes through the input check
(:mod:`pneumoloc.inference.input_check`); a refused one gets a ``refused`` row and a record
with the reasons and no probability. An ``--out`` holding an earlier run is refused unless
``resume`` or ``overwrite`` (:mod:`pneumoloc.predict.runfolder`, which also makes pseudonyms).
"""

from pneumoloc.predict.inputs import (
    IDENTIFIER_KEYWORDS,
    InputFile,
    ReadResult,
    assign_ids,
    collect_inputs,
    dicom_identifiers,
    read_input,
)
from pneumoloc.predict.outputs import SUMMARY_COLUMNS, SUMMARY_NAME, PredictRow
from pneumoloc.predict.run import PredictRunResult, predict_paths

__all__ = [
    "IDENTIFIER_KEYWORDS",
    "SUMMARY_COLUMNS",
    "SUMMARY_NAME",
    "InputFile",
    "PredictRow",
    "PredictRunResult",
    "ReadResult",
    "assign_ids",
    "collect_inputs",
    "dicom_identifiers",
    "predict_paths",
    "read_input",
]
