"""The permission bits a plain ``open()`` / ``mkdir()`` would give, for outputs written through temporary files.

``tempfile.mkstemp`` creates files 0600 and ``mkdtemp`` folders 0700 whatever the umask; an atomic write that
renames them into place keeps those modes, so a LoRA or checkpoint would be readable by its owner only (ComfyUI
or a colleague under another uid could not load it). Outputs get ``0666 & ~umask`` / ``0777 & ~umask`` instead.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _LOCK:  # elsewhere the only way to read it is to set it: put it back at once
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def give_normal_mode(path: Path) -> None:
    """Set ``path`` (a file or a folder, not followed into) to the mode a plain create would have given."""
    os.chmod(path, dir_mode() if path.is_dir() else file_mode())
