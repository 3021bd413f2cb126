"""Where a store keeps its objects: a local directory, or any fsspec URL.

Both backends address objects by a relative POSIX key (``"ab/cdef….kvc"``,
``"manifest/job/….json"``) and give the same guarantee: an object is visible whole or
not at all.

- :class:`LocalBackend` (a path, or a ``file://`` URL) writes a temp file in the same
  directory, fsyncs it and renames it over the name (:func:`atomic_write`); entries are
  opened by path, so a reader maps only the parts of a file it decodes.
- :class:`FsspecBackend` (``s3://``, ``gs://``, ``memory://``, ...) writes an object
  store's object with one PUT (``pipe_file``), which the store makes visible atomically
  (large objects go up as a multipart upload, which appears only when completed).
  Filesystems that are not object stores (sftp, hdfs, ...) get a temp name in the same
  folder, then a rename (``mv``). Reads fetch the whole object (entries are small) in
  one ranged GET, bounded by what an entry of its tokens can take.

Temp names are ``.<name>.<random>.tmp`` on both; :meth:`list` skips them.

Reads return the bytes with their *identity* (inode, size and mtime on a local disk;
the CRC-32 and size of the bytes on fsspec), and :meth:`quarantine` moves an object
aside only if it still is those bytes: a reader that found damage never moves aside the
good entry a writer has put in its place since. Whatever a backend fails on that is not
the object's absence is an ``OSError`` (:class:`~kvcodec.errors.AccessError` for the
errors a filesystem library raises of its own types, e.g. botocore's): the environment
failed, not the bytes.
"""
from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path

from ..core.paths import open_regular
from ..errors import AccessError, BackendError, ConfigError, CorruptError
from ..format.container import atomic_write
from .naming import STALE_TEMP_S, first_line, is_temp, temp_name
from .remote import FsspecBackend

# The pip requirement that brings each protocol's fsspec implementation.
EXTRAS = {"s3": "kvcodec-toolkit[s3]", "s3a": "kvcodec-toolkit[s3]", "gs": "gcsfs",
          "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def filesystem(url: str, storage_options: dict | None = None, what: str = "store"):
    """``(fs, path)`` of a path or fsspec URL (``fsspec.core.url_to_fs``), or a one-line
    error naming ``what`` it is: a :class:`BackendError` saying what to install when the
    protocol's package is missing (fsspec's ImportError), a :class:`ConfigError` for a
    protocol fsspec does not know (its ValueError) or options its filesystem refuses."""
    import fsspec

    protocol = url.split("://", 1)[0].split("::")[-1] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        need = EXTRAS.get(protocol)
        hint = f"; pip install {need}" if need else ""
        raise BackendError(f"{what} {url}: {first_line(exc)}{hint}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} {url}: {first_line(exc)}; give a local path or a URL "
                          "fsspec knows (s3://, gs://, memory://, ...)") from None


def open_backend(root, storage_options: dict | None = None):
    """The backend of ``root``: a local path or ``file://`` URL, or any other fsspec URL
    (``storage_options`` go to its filesystem, on top of fsspec's config and the
    environment, e.g. AWS credentials)."""
    if not isinstance(root, (str, os.PathLike)):  # None or 3: Path()'s TypeError
        raise ConfigError(f"a store is a directory or a URL, got {type(root).__name__}")
    if not isinstance(root, str) or "://" not in root:
        return LocalBackend(root)
    from fsspec.implementations.local import LocalFileSystem

    fs, path = filesystem(root, storage_options, "store")
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(path)
    return FsspecBackend(fs, path, root)


def _file_identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LocalBackend:
    """A local directory (created if missing); locations are :class:`Path` objects."""

    remote = False  # reads wait on a disk, not a network

    def __init__(self, root):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # said as "File exists: ..."
            raise ConfigError(f"store {root}: a file (or under one), not a directory; give "
                              "a directory or a URL such as s3://bucket/kv") from None

    def location(self, rel: str) -> Path:
        return self.root / rel

    def rel(self, loc) -> str:
        return Path(loc).relative_to(self.root).as_posix()

    def exists(self, rel: str) -> bool:
        return self.location(rel).exists()

    def size(self, rel: str) -> int:
        return self.location(rel).stat().st_size

    def read(self, rel: str) -> bytes:
        with open_regular(self.location(rel)) as f:
            return f.read()

    def fetch(self, rel: str, limit: int) -> tuple[bytes, tuple]:
        """The bytes of ``rel`` (CorruptError if over ``limit``) and their identity
        (inode, size, mtime). The file is closed on return: an entry holds no descriptor
        while it decodes."""
        with open_regular(self.location(rel)) as f:
            st = os.fstat(f.fileno())
            if st.st_size > limit:
                raise CorruptError(f"{self.location(rel)}: {st.st_size} bytes, more than "
                                   f"the {limit} an entry of its tokens can need")
            data = f.read(st.st_size + 1)
        if len(data) != st.st_size:
            raise AccessError(errno.EAGAIN, f"{self.location(rel)} changed while it was read")
        return data, _file_identity(st)

    def write(self, rel: str, data: bytes) -> None:
        path = self.location(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)

    def quarantine(self, rel: str, identity=None) -> str | None:
        """Rename ``rel`` to ``rel + ".bad"`` if it still is the file of ``identity``
        (any file, if None); returns the new location, or None if nothing was moved
        (another reader moved it first, or a writer has replaced it since it was read).

        The file is first renamed to a private name, then its identity is checked: a
        check and then a rename would move a writer's new file that landed in between.
        A new file moved that way goes back, unless yet another writer has put one
        there meanwhile (a hard link never replaces)."""
        path = self.location(rel)
        bad = self.location(rel + ".bad")
        hold = path.with_name(f".{path.name}.{uuid.uuid4().hex}.hold")
        try:
            os.rename(path, hold)
        except OSError:
            return None
        try:
            same = identity is None or _file_identity(os.stat(hold)) == tuple(identity)
            if same:
                os.replace(hold, bad)
                return str(bad)
            try:
                os.link(hold, path)
            except FileExistsError:
                pass  # a newer writer's file is there: ours, as good, goes
            os.unlink(hold)
        except OSError:
            pass
        return None

    def _walk(self, prefix: str):
        """``(folder, name, rel)`` of every file under ``prefix``, temp files skipped. The
        relative key is cut from the walked path's string: a pathlib ``relative_to`` per
        file cost ~20 us, most of a 20,000-entry scan."""
        top = os.path.join(self.root, prefix)  # os.walk's folders all start with it
        head = prefix.strip("/")
        for folder, _, names in os.walk(top):
            sub = folder[len(top):].lstrip(os.sep).replace(os.sep, "/")
            base = f"{head}/{sub}" if head and sub else head or sub
            for name in names:
                rel = f"{base}/{name}" if base else name
                if not is_temp(rel):
                    yield folder, name, rel

    def list(self, prefix: str = ""):
        """Relative keys of every object under the folder ``prefix``, temp files skipped."""
        for _, _, rel in self._walk(prefix):
            yield rel

    def scan(self, prefix: str = ""):
        """``(rel, size, mtime)`` of every object under ``prefix`` (temp files skipped;
        objects that vanish while listed are skipped too)."""
        for folder, name, rel in self._walk(prefix):
            try:
                st = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            yield rel, st.st_size, st.st_mtime

    def prefetch(self, rel: str) -> None:
        """Ask the kernel to start reading ``rel`` now (``POSIX_FADV_WILLNEED``), so a
        later read finds it in memory: a reader that checks while the disk reads ahead.
        A hint only: nothing is raised."""
        try:
            fd = os.open(self.location(rel), os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)

    def read_head(self, rel: str, n: int) -> bytes:
        """The first ``n`` bytes of ``rel`` (fewer if it is shorter)."""
        with open_regular(self.location(rel)) as f:
            return f.read(n)

    def remove(self, rel: str, size: int | None = None, mtime: float | None = None) -> bool:
        """Delete ``rel`` if it is still the object listed with ``size`` and ``mtime``
        (any, if None): a writer's newer object under the name stays. Returns whether it
        was removed. A reader that has the file open keeps reading it (POSIX unlink)."""
        path = self.location(rel)
        try:
            st = path.stat()
            if (size is not None and st.st_size != size) or (
                    mtime is not None and st.st_mtime != mtime):
                return False
            path.unlink()
            return True
        except FileNotFoundError:
            return False

    def sweep(self, older_than: float = STALE_TEMP_S) -> int:
        """Remove temp files older than ``older_than`` seconds: what writers killed
        mid-write left. Returns how many."""
        removed, cutoff = 0, time.time() - older_than
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder, name)
                try:
                    if is_temp(name) and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except OSError:
                    pass  # another sweeper, or the writer renamed it
        return removed

