"""One run per output folder: an exclusive lock on ``output.dir`` held for the whole life of a training run.

Two ``qflux train`` started with the same ``output.dir`` (a scheduler retrying a job, a script started twice)
would both run: ``metrics.jsonl`` gets both runs' rows interleaved, and the checkpoints and the final LoRA are
whichever run wrote last. The "output already holds a run" check cannot catch it, since it runs before either
has written anything. So a run takes ``output.dir/.qflux-run.lock`` with ``fcntl.flock(LOCK_EX | LOCK_NB)``
before any work, and a second run is refused (``UserError``, exit 2) with the holder's pid, host and start
time, which the holder writes into the file once it has the lock.

Why ``flock`` and not a pid file: the kernel drops the lock when the last file descriptor of it closes, so
a run killed with SIGKILL (or by the OOM killer, or a node that rebooted) never leaves a stale lock that a
user would have to delete by hand, and no pid is ever guessed to be alive or dead. The file itself may stay
behind after a kill: it is only a name to lock, the next run takes it over. The descriptor is opened with
``O_CLOEXEC``, so programs the run starts do not inherit it; a process *forked* from the run (a data worker)
shares it and keeps the lock until it ends too.

The lock file is removed when the run ends (while still locked); a run that finds, after taking the lock,
that its file is no longer the one at the path (removed by the previous holder in between) takes the new
one, so two runs can never both hold "the" lock. A run that created ``output.dir`` and fails before writing
anything into it removes the folder again (nothing is left behind, as before the lock existed). A refused
run never removes or changes the lock file.

**Network file systems.** On Linux NFS (v3 with lockd, v4) ``flock`` is carried out as a whole-file POSIX
lock on the server, so it also keeps out runs on other hosts; but with the mount options ``local_lock=flock``
/ ``local_lock=all`` or ``nolock`` (and on some other network file systems, e.g. Lustre without ``-o flock``
or older CIFS mounts) it is local to each client: it then keeps out a second run on the same host only, and
two hosts sharing one ``output.dir`` are not detected. A host that dies holding an NFS lock keeps it until the
server's lease expires (NFSv4: about 90 s). Where the file system refuses locks altogether (``ENOLCK``,
``EOPNOTSUPP``) the run warns and goes on unlocked.

**Several processes** (``accelerate launch``): only the main process takes the lock; the others share its
run (``is_main``; before the process group exists, ``RANK`` 0 of the launcher). **``qflux cache``** takes no
lock: several processes filling one ``cache.dir`` is supported (each entry is written to a temporary file and
renamed into place, and verified on read), so there is nothing to exclude.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from qflux.errors import UserError

LOCK_FILE = ".qflux-run.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
# A lock found held is asked again for this long before the run is refused: another run's probe
# (``check_free``) holds it for microseconds, and a new holder writes its pid just after locking.
_RETRIES, _PAUSE = 10, 0.05


def main_process() -> bool:
    """Whether this process is the one that holds the lock of a launch: rank 0 of the process group once it
    exists, else of the launcher's ``RANK`` (torchrun, ``accelerate launch``); True without a launcher."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rank = os.environ.get("RANK", "0").strip()
    return not rank.isdigit() or int(rank) == 0


@dataclass
class _Held:
    fd: int | None  # None: the file system refused locks, the run goes on unlocked
    file: Path
    created: Path | None  # the topmost folder this run created for the lock (removed again if left empty)
    count: int = 1


# output folder (absolute) -> the lock this process holds there: taken again by the same process (``qflux
# train`` takes it before ``--cache`` encoding, then ``train()`` takes it) it is counted, not refused
_HELD: dict[str, _Held] = {}


def _key(folder: Path) -> str:
    return str(folder.expanduser().resolve())


def _describe(raw: str) -> str:
    """``pid 1234 on host h, started 2026-12-03 12:01:02`` from the lock file's contents."""
    try:
        info = json.loads(raw)
        return f"pid {int(info['pid'])} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: its lock file names no process yet"


def _in_use(folder: Path, raw: str) -> UserError:
    return UserError(f"output.dir {folder} is in use by another qflux run ({_describe(raw)}); wait for it or "
                     "choose another output.dir")


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _topmost_missing(folder: Path) -> Path | None:
    """The outermost folder of ``folder``'s path that does not exist yet (what ``mkdir -p`` would create)."""
    missing = None
    probe = folder.absolute()
    while not probe.exists():
        missing, probe = probe, probe.parent
        if probe.parent == probe:
            break
    return missing


def check_free(folder: Path) -> None:
    """``UserError`` naming the holder when another process holds the lock of ``folder``; writes and creates
    nothing (preflight: the refusal comes before the dataset is read). Taking the lock is ``RunLock``."""
    file = Path(folder).expanduser() / LOCK_FILE
    if _key(Path(folder)) in _HELD or not file.is_file():
        return
    try:
        fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # unreadable: RunLock will say what is wrong when it takes it
    try:
        for attempt in range(_RETRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                if attempt == _RETRIES - 1:
                    raise _in_use(Path(folder), _read(fd)) from None
                time.sleep(_PAUSE)
                continue
            except OSError:
                return  # no locks on this file system: RunLock warns
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


class RunLock:
    """``with RunLock(output_dir): ...``: the exclusive lock of a run folder for the block (see the module
    docstring). Creates the folder if needed; refuses with ``UserError`` (exit 2) when another process holds
    it; reentrant within one process. ``enabled=False`` (the non-main processes of a launch) does nothing."""

    def __init__(self, folder: Path | str, enabled: bool = True, warn: Callable[[str], None] | None = None,
                 command: str = "qflux train") -> None:
        self.folder = Path(folder).expanduser()
        self.enabled = enabled
        self.command = command
        self._warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
        self._taken = False

    @property
    def file(self) -> Path:
        return self.folder / LOCK_FILE

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        if not self.enabled or self._taken:
            return
        key = _key(self.folder)
        if key in _HELD:
            _HELD[key].count += 1
            self._taken = True
            return
        created = _topmost_missing(self.folder)
        _HELD[key] = self._take(created)
        self._taken = True

    def _take(self, created: Path | None) -> _Held:
        raw = ""
        for _ in range(_RETRIES):
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the folder was removed in between (a run that failed early): again
                continue
            except OSError as err:
                self._forget(created)
                raise UserError(f"output.dir: cannot create the run's lock file {self.file} ({err.strerror}); "
                                "set output.dir to a writable folder") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = _read(fd)
                os.close(fd)
                time.sleep(_PAUSE)
                continue
            except OSError as err:
                if err.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                self._warn(f"the file system of {self.folder} does not support locks ({err.strerror}): this run "
                           "cannot keep a second qflux run out of output.dir")
                self._write(fd)
                os.close(fd)
                return _Held(None, self.file, None)
            if not _same_file(fd, self.file):  # its last holder removed it after we opened it: take the new one
                os.close(fd)
                continue
            self._write(fd)
            return _Held(fd, self.file, created)
        self._forget(created)
        raise _in_use(self.folder, raw)

    def _write(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z").strip(),
                "command": self.command}
        data = (json.dumps(info) + "\n").encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as err:  # a full disk: the lock holds all the same, only the name of the holder is lost
            self._warn(f"cannot write {self.file} ({err.strerror}); the lock holds, without the holder's name")

    def _forget(self, created: Path | None) -> None:
        """A run refused (or unable to create the file) removes the folders it created for it, if empty."""
        if created is not None:
            _remove_empty(self.folder, created)

    def release(self) -> None:
        if not self._taken:
            return
        self._taken = False
        key = _key(self.folder)
        held = _HELD.get(key)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[key]
        if held.fd is None:
            return
        try:
            if _same_file(held.fd, held.file):
                held.file.unlink()  # while still locked: a run that opened it meanwhile sees it gone and retries
        except OSError:
            pass
        finally:
            os.close(held.fd)  # the lock ends here
        if held.created is not None:
            _remove_empty(self.folder, held.created)


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` (included) as long as they are empty."""
    probe = folder.absolute()
    top = top.absolute()
    while True:
        try:
            probe.rmdir()
        except OSError:
            return
        if probe == top or probe.parent == probe:
            return
        probe = probe.parent


def held(folder: Path | str) -> bool:
    """Whether this process holds the lock of ``folder`` (for tests and assertions)."""
    return _key(Path(folder)) in _HELD
