"""The fsspec backend of a store (``s3://``, ``gs://``, ``memory://``, sftp, ...): see
:mod:`.backends` for what every backend guarantees."""
from __future__ import annotations

import errno
import functools

from ..errors import AccessError, ConfigError, CorruptError, KVCodecError
from ..format.container import crc32
from .held import HELD
from .naming import OBJECT_STORES, STALE_TEMP_S, first_line, is_temp, temp_name


def _content_identity(data: bytes) -> tuple:
    """What tells the bytes of one read of an object from another version's: their
    CRC-32 and size (fetched in one GET, with no ETag; a damaged read's check reads
    the object again). The native CRC (``zlib.crc32``'s value): 0.03 ms for a 650 KB
    entry against zlib's 0.27 ms, which is 2 ms of CPU for a 2k-token prompt's entries,
    on cores the link's reads and the decode share."""
    return ("crc32", len(data), crc32(data))


def _mtime(info: dict) -> float:
    """An object's modification time (seconds since the epoch) from its fsspec info."""
    for k in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(k)
        if v is None:
            continue
        if hasattr(v, "timestamp"):
            return float(v.timestamp())
        try:
            return float(v)
        except (TypeError, ValueError):
            continue
    return 0.0


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
                                  f"{first_line(exc)}") from exc
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
        """The bytes of ``rel`` (CorruptError if over ``limit``) and their identity
        (:func:`_content_identity`): those a lookup held (:meth:`hold`), else one ranged
        GET of at most ``limit + 1`` bytes: one round trip, where asking the size first
        took two (a 2k-token prompt's 8 entries from moto behind a 1 Gbit/s relay: 66-77
        ms against 128-145 ms). A store that refuses the range (an empty object: S3
        answers 416) is asked for the size, then the bytes."""
        held = HELD.take((self.root, rel))
        if held is not None:
            data, identity = held
        else:
            data, identity = self._fetch(rel, limit)
        if len(data) > limit:
            raise CorruptError(f"{self.location(rel)}: more than the {limit} bytes an entry "
                               "of its tokens can need")
        return data, identity

    def hold(self, rel: str, limit: int) -> bool:
        """Whether ``rel`` exists, asked with a GET whose bytes (at most ``limit + 1``)
        are kept for this process's next :meth:`fetch` of it (:mod:`.held`); an object
        too large for an entry exists (that fetch reports it). Raises OSError where the
        store cannot say."""
        if HELD.has((self.root, rel)):
            return True
        if not HELD.room():  # as many bytes held as may be: asked as without holding
            return self.exists(rel)
        try:
            data, identity = self._fetch(rel, limit)
        except FileNotFoundError:
            return False
        except CorruptError:  # over the limit: there, and the fetch that opens it says so
            return True
        HELD.put((self.root, rel), data, identity)
        return True

    def _fetch(self, rel: str, limit: int) -> tuple[bytes, tuple]:
        try:
            data = self.fs.cat_file(self._full(rel), start=0, end=limit + 1)
        except FileNotFoundError:
            raise
        except OSError:
            data = self._sized_fetch(rel, limit)
        return data, _content_identity(data)

    def _sized_fetch(self, rel: str, limit: int) -> bytes:
        size = int(self._info(rel).get("size") or 0)
        if size > limit:
            raise CorruptError(f"{self.location(rel)}: {size} bytes, more than the {limit} "
                               "an entry of its tokens can need")
        data = self.fs.cat_file(self._full(rel))
        if len(data) != size:  # replaced between the two requests
            raise AccessError(errno.EAGAIN, f"{self.location(rel)} changed while it was read")
        return data

    def write(self, rel: str, data: bytes) -> None:
        HELD.drop((self.root, rel))
        full = self._full(rel)
        if self.object_store:
            self.fs.pipe_file(full, data)
            return
        folder, name = full.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/{temp_name(name)}"
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
        still holds the bytes of ``identity`` (any, if None; read again to tell, which
        only damage costs); returns the new location, or None if nothing was moved
        (gone, or replaced since it was read).

        fsspec has no conditional delete, so a writer that replaces the object between
        this check and the delete (milliseconds) loses its write; the next ``put`` of
        that text writes it again."""
        HELD.drop((self.root, rel))
        try:
            if identity is not None:
                size = int(tuple(identity)[1])
                same = (_content_identity(self.fs.cat_file(self._full(rel), start=0,
                                                           end=size + 1)) == tuple(identity)
                        if size else self.size(rel) == 0)  # an empty object: no range
                if not same:
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
            if full.startswith(self.path + "/") and not is_temp(full):
                yield full[len(self.path) + 1:]

    def scan(self, prefix: str = ""):
        """``(rel, size, mtime)`` of every object under ``prefix`` (temp names skipped):
        one listing with details (S3: pages of 1,000 objects)."""
        start = f"{self.path}/{prefix}".rstrip("/")
        try:
            found = self.fs.find(start, detail=True)
        finally:
            self.fs.invalidate_cache()
        for full, info in found.items():
            if full.startswith(self.path + "/") and not is_temp(full):
                yield full[len(self.path) + 1:], int(info.get("size") or 0), _mtime(info)

    def read_head(self, rel: str, n: int) -> bytes:
        """The first ``n`` bytes of ``rel`` (one ranged GET)."""
        return self.fs.cat_file(self._full(rel), start=0, end=n)

    def remove(self, rel: str, size: int | None = None, mtime: float | None = None) -> bool:
        """Delete ``rel``; if ``size`` is given, only while it still has that size (an
        object store has no conditional delete: a writer's same-sized replacement in the
        milliseconds between may go, which costs a miss). Returns whether it was removed;
        a reader that loses the race gets a miss, not an error."""
        HELD.drop((self.root, rel))
        full = self._full(rel)
        try:
            if size is not None and int(self._info(rel).get("size") or 0) != size:
                return False
            self.fs.rm_file(full)
            return True
        except FileNotFoundError:
            return False
        finally:
            self.fs.invalidate_cache()

    def sweep(self, older_than: float = STALE_TEMP_S) -> int:
        """Nothing swept: an object store writes with one PUT and leaves no temp; the
        temp names other remote filesystems rename into place are left, since listing a
        remote tree at every job start costs more than a rare leftover does."""
        return 0
