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
  folder, then a rename (``mv``). Reads fetch the whole object: entries are small.

Temp names are ``.<name>.<random>.tmp`` on both; :meth:`list` skips them.

Reads return the bytes with their *identity* (inode, size and mtime on a local disk; the
ETag or generation and size on an object store), and :meth:`quarantine` moves an object
aside only if it still is those bytes: a reader that found damage never moves aside the
good entry a writer has put in its place since. Whatever a backend fails on that is not
the object's absence is an ``OSError`` (:class:`~kvcodec.errors.AccessError` for the
errors a filesystem library raises of its own types, e.g. botocore's): the environment failed, not the bytes.
"""
from __future__ import annotations

import errno
import functools
import os
import time
import uuid
from pathlib import Path

from ..errors import AccessError, BackendError, ConfigError, CorruptError, KVCodecError
from ..format.container import atomic_write

# fsspec protocols whose writes are single atomic PUTs (no rename, no folders).
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl",
                           "oci", "oss", "memory"})
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
        raise BackendError(f"{what} {url}: {_first_line(exc)}{hint}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} {url}: {_first_line(exc)}; give a local path or a URL "
                          "fsspec knows (s3://, gs://, memory://, ...)") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def open_backend(root, storage_options: dict | None = None):
    """The backend of ``root``: a local path or ``file://`` URL, or any other fsspec URL
    (``storage_options`` go to its filesystem, on top of fsspec's config and the
    environment, e.g. AWS credentials)."""
    if not isinstance(root, str) or "://" not in root:
        return LocalBackend(root)
    from fsspec.implementations.local import LocalFileSystem

    fs, path = filesystem(root, storage_options, "store")
    if isinstance(fs, LocalFileSystem):
        return LocalBackend(path)
    return FsspecBackend(fs, path, root)


def _file_identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _object_identity(info: dict) -> tuple:
    """What tells one version of an object from another: the ETag (S3, Azure) or
    generation (GCS) where the store gives one, else the modification time; and size."""
    tag = next((info[k] for k in ("ETag", "etag", "generation", "version_id", "VersionId",
                                  "mtime", "LastModified", "last_modified", "created")
                if info.get(k) is not None), None)
    return (str(tag), int(info.get("size") or 0))


def _temp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"


# Temp files older than this were left by writers killed mid-write (a live write holds
# its temp for milliseconds); sweep() removes them.
STALE_TEMP_S = 600.0


def _is_temp(rel: str) -> bool:
    """A writer's temp file, or a file a quarantining reader holds for a moment (its
    ``.hold``, left behind only if that reader was killed then)."""
    name = rel.rsplit("/", 1)[-1]
    return name.startswith(".") and name.endswith((".tmp", ".hold"))


class LocalBackend:
    """A local directory (created if missing); locations are :class:`Path` objects."""

    remote = False  # reads wait on a disk, not a network

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def location(self, rel: str) -> Path:
        return self.root / rel

    def rel(self, loc) -> str:
        return Path(loc).relative_to(self.root).as_posix()

    def exists(self, rel: str) -> bool:
        return self.location(rel).exists()

    def size(self, rel: str) -> int:
        return self.location(rel).stat().st_size

    def read(self, rel: str) -> bytes:
        return self.location(rel).read_bytes()

    def fetch(self, rel: str, limit: int) -> tuple[bytes, tuple]:
        """The bytes of ``rel`` (CorruptError if over ``limit``) and their identity
        (inode, size, mtime). The file is closed on return: an entry holds no descriptor
        while it decodes."""
        with open(self.location(rel), "rb") as f:
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

    def list(self, prefix: str = ""):
        """Relative keys of every object under the folder ``prefix``, temp files skipped."""
        for folder, _, names in os.walk(self.location(prefix)):
            for name in names:
                rel = Path(folder, name).relative_to(self.root).as_posix()
                if not _is_temp(rel):
                    yield rel

    def sweep(self, older_than: float = STALE_TEMP_S) -> int:
        """Remove temp files older than ``older_than`` seconds: what writers killed
        mid-write left. Returns how many."""
        removed, cutoff = 0, time.time() - older_than
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = Path(folder, name)
                try:
                    if _is_temp(name) and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except OSError:
                    pass  # another sweeper, or the writer renamed it
        return removed


class _Guarded:
    """An fsspec filesystem whose calls raise OSError for the filesystem's own errors
    (botocore's NoCredentialsError...), so that an unreachable store is one clear error
    that stops a job, like any store that cannot be written."""

    def __init__(self, fs, url: str):
        self._fs, self._url = fs, url

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except (OSError, KVCodecError):
                raise
            except Exception as exc:  # noqa: BLE001 - the filesystem's own error types
                raise AccessError(errno.EIO, f"store {self._url}: {type(exc).__name__}: "
                                  f"{_first_line(exc)}") from exc
        return call


class FsspecBackend:
    """A folder of an fsspec filesystem; locations are URLs (``root + "/" + rel``)."""

    remote = True  # reads wait on a network: fetched in parallel

    def __init__(self, fs, path: str, url: str):
        self.fs = _Guarded(fs, url.rstrip("/"))
        self.path, self.root = path.rstrip("/"), url.rstrip("/")
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self.object_store = bool(protocols & OBJECT_STORES)

    def location(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def rel(self, loc) -> str:
        loc = str(loc)
        if not loc.startswith(self.root + "/"):
            raise ConfigError(f"{loc} is not in the store {self.root}")
        return loc[len(self.root) + 1:]

    def _full(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def exists(self, rel: str) -> bool:
        # Not ``fs.isfile``, which answers False on any error (bad credentials, no network).
        try:
            return self._info(rel)["type"] == "file"
        except FileNotFoundError:
            return False

    def size(self, rel: str) -> int:
        return int(self.fs.size(self._full(rel)))

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._full(rel))

    def _info(self, rel: str) -> dict:
        return self.fs.info(self._full(rel))

    def fetch(self, rel: str, limit: int) -> tuple[bytes, tuple]:
        """The bytes of ``rel`` (CorruptError if over ``limit``, checked before they are
        fetched) and their identity (ETag or generation, and size)."""
        info = self._info(rel)
        size = int(info.get("size") or 0)
        if size > limit:
            raise CorruptError(f"{self.location(rel)}: {size} bytes, more than the {limit} "
                               "an entry of its tokens can need")
        data = self.fs.cat_file(self._full(rel))
        if len(data) != size:  # replaced between the two requests
            raise AccessError(errno.EAGAIN, f"{self.location(rel)} changed while it was read")
        return data, _object_identity(info)

    def write(self, rel: str, data: bytes) -> None:
        full = self._full(rel)
        if self.object_store:
            self.fs.pipe_file(full, data)
            return
        folder, name = full.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/{_temp_name(name)}"
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, full)
        except OSError:
            # Some servers (SFTP) refuse to rename over an existing name: a concurrent
            # writer of the same key put it there first.
            self.fs.rm_file(tmp)
            if not self.fs.isfile(full):
                raise

    def quarantine(self, rel: str, identity=None) -> str | None:
        """Move ``rel`` to ``rel + ".bad"`` (a copy and a delete on object stores) if it
        still is the object of ``identity`` (any, if None); returns the new location, or
        None if nothing was moved (gone, or replaced since it was read).

        fsspec has no conditional delete, so a writer that replaces the object between
        this check and the delete (milliseconds) loses its write; the next ``put`` of
        that text writes it again."""
        try:
            if identity is not None and _object_identity(self._info(rel)) != tuple(identity):
                return None
            self.fs.mv(self._full(rel), self._full(rel + ".bad"))
        except Exception:  # gone (another reader moved it), or the store failed
            return None
        finally:
            self.fs.invalidate_cache()
        return self.location(rel + ".bad")

    def list(self, prefix: str = ""):
        """Relative keys of every object under the folder ``prefix``, temp files skipped.
        Listings are not cached, so a later :meth:`exists` asks the store again (another
        process may have written since)."""
        start = f"{self.path}/{prefix}".rstrip("/")
        try:
            found = self.fs.find(start)
        finally:
            self.fs.invalidate_cache()
        for full in found:
            if full.startswith(self.path + "/") and not _is_temp(full):
                yield full[len(self.path) + 1:]

    def sweep(self, older_than: float = STALE_TEMP_S) -> int:
        """Nothing swept: an object store writes with one PUT and leaves no temp; the
        temp names other remote filesystems rename into place are left, since listing a
        remote tree at every job start costs more than a rare leftover does."""
        return 0
