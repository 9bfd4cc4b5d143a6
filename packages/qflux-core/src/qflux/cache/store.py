"""On-disk store of cache entries: ``entries/ab/<key>.safetensors`` plus an append-only ``index.jsonl``.

- Start-up reads the index only (no directory scan).
- Writes are atomic (temporary file + ``os.replace``); index lines are single small appends, so several
  processes can fill one cache at once. A key may get several index lines (two writers); a file is valid
  when its bytes match any of them.
- Every read checks size and sha256 against the index before decoding: a corrupt or truncated entry is
  reported, removed and re-encoded by the caller, never used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from qflux.cache.serialize import from_bytes, read_metadata, signature_from_metadata, to_bytes
from qflux.errors import UserError
from qflux.killpoints import pause_point
from qflux.types import EncodedSample

INDEX = "index.jsonl"


@dataclass(frozen=True)
class EntryStamp:
    bytes: int
    sha256: str


@dataclass
class PrunePlan:
    """What ``prune`` removes, and what it keeps because another trainer (or an unknown one) wrote it."""

    remove: list[str]
    bytes: int  # on disk, of the entries to remove
    kept_other: dict[str, int]  # trainer ("unknown": written before the index recorded it) -> entries kept


UNKNOWN_OWNER = "unknown"


@dataclass
class CacheProblem:
    key: str
    path: Path
    reason: str


class EmbeddingCache:
    def __init__(self, root: Path, warn: Callable[[str], None] = lambda message: None,
                 owner: str | None = None) -> None:
        self.root = Path(root)
        self.warn = warn
        self.owner = owner  # the trainer whose entries this writes: recorded in the index, so that prune
        self._index: dict[str, set[EntryStamp]] = {}  # can leave other trainers' entries in a shared cache
        self._owners: dict[str, str] = {}
        self._read_index()

    # ------------------------------------------------------------------ index
    def _read_index(self) -> None:
        path = self.root / INDEX
        if not path.is_file():
            return
        with path.open("r", encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    stamp = EntryStamp(int(row["bytes"]), str(row["sha256"]))
                    key = str(row["key"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line from a killed writer: that entry is simply re-encoded
                self._index.setdefault(key, set()).add(stamp)
                if isinstance(row.get("trainer"), str):
                    self._owners[key] = row["trainer"]

    def _row(self, key: str, stamp: EntryStamp) -> str:
        row = {"key": key, "bytes": stamp.bytes, "sha256": stamp.sha256}
        if key in self._owners:
            row["trainer"] = self._owners[key]
        return json.dumps(row) + "\n"

    def _append_index(self, key: str, stamp: EntryStamp) -> None:
        if self.owner is not None:
            self._owners[key] = self.owner
        line = self._row(key, stamp)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / INDEX, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        except OSError as err:  # os.write names no file: the message must name the index, not the entry
            raise OSError(err.errno, err.strerror, str(self.root / INDEX)) from err
        finally:
            os.close(fd)

    def path_of(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        return sorted(self._index)

    # ------------------------------------------------------------------ entries
    def put(self, key: str, sample: EncodedSample) -> None:
        data = to_bytes(sample)
        stamp = EntryStamp(len(data), hashlib.sha256(data).hexdigest())
        path = self.path_of(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            pause_point("cache-entry-before-rename")  # a kill here leaves a temporary file no reader opens
            os.replace(tmp, path)
            tmp = None
            pause_point("cache-entry-before-index")  # here, a complete file the index does not list: not read
            self._append_index(key, stamp)
        except BaseException as err:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(err, OSError):
                what = err.filename or path
                if err.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise UserError(f"cache.dir: cannot write the cache entry {what} ({err.strerror}): the disk is "
                                    "full; free space on it, set cache.dir to a disk with room, or set "
                                    "cache.enabled: false") from err
                raise UserError(
                    f"cache.dir: cannot write the cache entry {what} ({err.strerror or err}); "
                    "free space there, set cache.dir to another folder, or set cache.enabled: false"
                ) from err
            raise
        self._index.setdefault(key, set()).add(stamp)

    def get(self, key: str) -> EncodedSample | None:
        """The verified entry, or None (absent, or corrupt: then reported and dropped)."""
        stamps = self._index.get(key)
        if not stamps:
            return None
        problem = None
        try:
            data = self.path_of(key).read_bytes()
        except OSError:
            problem = "entry file is missing"
        else:
            stamp = EntryStamp(len(data), hashlib.sha256(data).hexdigest())
            if stamp not in stamps:
                self._read_index()  # another process may have re-written the entry and appended its stamp
                stamps = self._index.get(key, set())
            if stamp not in stamps:
                problem = "size or sha256 differs from the index (corrupt or truncated)"
            else:
                try:
                    return from_bytes(data, read_metadata(data))
                except (ValueError, KeyError) as err:
                    problem = f"undecodable ({err})"
        self.warn(f"cache entry {self.path_of(key)}: {problem}; re-encoding it")
        self.drop(key)
        return None

    def signature(self, key: str) -> tuple | None:
        """The entry's batching signature from its header alone (no tensor read); None if unreadable."""
        try:
            with self.path_of(key).open("rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else 0
                return signature_from_metadata(read_metadata(head + f.read(n)))
        except (OSError, ValueError, KeyError):
            return None

    def drop(self, key: str) -> None:
        self._index.pop(key, None)
        self.path_of(key).unlink(missing_ok=True)

    # ------------------------------------------------------------------ maintenance
    def verify(self) -> list[CacheProblem]:
        """Check every indexed entry (size, sha256, decodable); nothing is changed."""
        problems = []
        for key in self.keys():
            path = self.path_of(key)
            try:
                data = path.read_bytes()
            except OSError:
                problems.append(CacheProblem(key, path, "entry file is missing"))
                continue
            if EntryStamp(len(data), hashlib.sha256(data).hexdigest()) not in self._index[key]:
                problems.append(CacheProblem(key, path, "size or sha256 differs from the index"))
                continue
            try:
                from_bytes(data, read_metadata(data))
            except (ValueError, KeyError) as err:
                problems.append(CacheProblem(key, path, f"undecodable ({err})"))
        return problems

    def total_bytes(self) -> int:
        return sum(max(s.bytes for s in stamps) for stamps in self._index.values())

    def owner_of(self, key: str) -> str:
        return self._owners.get(key, UNKNOWN_OWNER)

    def plan_prune(self, keep: Iterable[str], trainer: str | None = None) -> PrunePlan:
        """The entries not in ``keep``; with ``trainer``, only those that trainer wrote (the others are counted
        in ``kept_other``: a shared cache holds other trainers' entries, which ``keep`` never lists)."""
        keep = set(keep)
        unused = [k for k in self.keys() if k not in keep]
        remove = [k for k in unused if trainer is None or self.owner_of(k) == trainer]
        kept: dict[str, int] = {}
        for key in set(unused) - set(remove):
            kept[self.owner_of(key)] = kept.get(self.owner_of(key), 0) + 1
        size = sum(max(s.bytes for s in self._index[k]) for k in remove)
        return PrunePlan(remove, size, dict(sorted(kept.items())))

    def prune(self, keep: Iterable[str], trainer: str | None = None) -> int:
        """Delete the entries ``plan_prune`` lists and rewrite the index compactly; returns how many."""
        removed = self.plan_prune(keep, trainer).remove
        for key in removed:
            self.drop(key)
            self._owners.pop(key, None)
        lines = "".join(self._row(k, s) for k in self.keys() for s in sorted(self._index[k], key=lambda s: s.sha256))
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".index-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(lines)
        os.replace(tmp, self.root / INDEX)
        return len(removed)
