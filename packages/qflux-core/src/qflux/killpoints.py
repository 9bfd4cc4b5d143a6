"""Named points where a test stops a command to SIGKILL it there (tests/training/test_kill_points.py).

Only tests set ``QFLUX_PAUSE_AT``: a comma list of point names. The first time the process reaches a listed
point, it writes the point's name into the file named by ``QFLUX_PAUSE_MARKER`` and waits, doing nothing, until
that file is removed or the process is killed. So the test kills it at exactly that point of a write (between
a temporary file and its rename, say) rather than at a random moment; or it copies the files as they are (what
a kill there would leave), removes the marker, and the command goes on to the next point. Unset, a point costs
one dictionary lookup.

The points (where each write stands when the process stops there):

- ``cache-entry-before-rename``: a cache entry's temporary file is complete, not yet renamed into place;
- ``cache-entry-before-index``: a cache entry's file is in place, its line not yet appended to the index;
- ``checkpoint-before-rename``: a checkpoint's temporary folder is complete, not yet renamed into place;
- ``export-temp-open``: the final LoRA export's temporary file has just been created, nothing written to it yet;
- ``export-before-rename``: the export's temporary file is complete, not yet renamed over the LoRA;
- ``sample-before-rename``: ``qflux sample``'s image is written to a temporary file, not yet renamed to ``--out``;
- ``grid-before-rename``: the same for a validation grid (``samples/step-NNNNNN.png``).
"""

from __future__ import annotations

import os

PAUSE_AT = "QFLUX_PAUSE_AT"
PAUSE_MARKER = "QFLUX_PAUSE_MARKER"
_paused: set[str] = set()  # the points this process has stopped at already


def pause_point(name: str) -> None:
    """Wait here (see the module's doc) when ``QFLUX_PAUSE_AT`` lists ``name``; otherwise do nothing."""
    wanted = os.environ.get(PAUSE_AT)
    if not wanted or name not in wanted.split(",") or name in _paused:
        return
    import time

    _paused.add(name)
    marker = os.environ.get(PAUSE_MARKER)
    if not marker:
        while True:  # nothing to release it: only a kill ends the wait
            time.sleep(3600)
    with open(marker + ".tmp", "w", encoding="utf-8") as f:
        f.write(name)
    os.replace(marker + ".tmp", marker)  # the test never reads a half-written marker
    while os.path.exists(marker):
        time.sleep(0.01)
