"""``pneumoloc listen``: a DICOM storage SCP that analyses each chest X-ray it receives and
sends an SR and a Secondary Capture of the result to the PACS with C-STORE.

* :mod:`~pneumoloc.listen.config`: :class:`ListenConfig`, :class:`Destination`;
* :mod:`~pneumoloc.listen.contexts`: the SOP classes and transfer syntaxes accepted;
* :mod:`~pneumoloc.listen.statuses`: the C-STORE statuses, and why each is chosen;
* :mod:`~pneumoloc.listen.handler`: :class:`StoreHandler`, check + decode + queue per C-STORE;
* :mod:`~pneumoloc.listen.worker`: :class:`AnalysisWorker`, the model and the results;
* :mod:`~pneumoloc.listen.sender`: C-STORE of the results to the destination;
* :mod:`~pneumoloc.listen.server`: :class:`Listener` and :func:`run_listener`.

Needs ``pneumoloc[pacs]`` (pynetdicom, highdicom). Research use only; see docs/pacs.md.
"""

from pneumoloc.listen.config import DEFAULT_AE_TITLE, DEFAULT_PORT, Destination, ListenConfig
from pneumoloc.listen.server import Listener, run_listener

__all__ = [
    "DEFAULT_AE_TITLE",
    "DEFAULT_PORT",
    "Destination",
    "ListenConfig",
    "Listener",
    "run_listener",
]
