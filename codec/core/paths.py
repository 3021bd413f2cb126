"""Where configs and codebooks live: the shipped ones and the user's (what
``kvcodec calibrate`` writes); and how every file kvcodec writes is written
(:func:`atomic_write`)."""
from __future__ import annotations

import errno
import json
import os
import select
import stat
import tempfile
import time
from pathlib import Path

from ..errors import ShapeError

# A document's text: at ~4 bytes a token, the 2**24 tokens a cache can hold. Read past
# this, /dev/zero or a pipe that never ends filled memory (a MemoryError traceback).
MAX_TEXT_BYTES = 64 << 20

# The repository's configs/ (editable installs: the package is the source tree's codec/,
# beside setup.py) and the copy inside the package (wheels). A folder named configs that
# merely sits beside an installed package in site-packages is not ours.
_PACKAGE = Path(__file__).resolve().parent.parent
_TREE = _PACKAGE.parent
CONFIG_DIR = _TREE / "configs" if (_TREE / "setup.py").is_file() else _PACKAGE / "configs"
PACKAGED_DIR = _PACKAGE / "configs"


def config_dirs() -> list[Path]:
    return [d for d in dict.fromkeys((CONFIG_DIR, PACKAGED_DIR)) if d.is_dir()]


def user_config_dir() -> Path:
    """Where ``kvcodec calibrate`` puts configs keyed to a model, which ``encode`` then
    picks up for ``config="default"``: ``$KVCODEC_CONFIG_DIR``, else the ``configs``
    folder of ``$KVCODEC_CACHE`` (default ``~/.cache/kvcodec/configs``)."""
    if os.environ.get("KVCODEC_CONFIG_DIR"):
        return Path(os.environ["KVCODEC_CONFIG_DIR"])
    cache = os.environ.get("KVCODEC_CACHE") or Path.home() / ".cache" / "kvcodec"
    return Path(cache) / "configs"


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, and another
    thread creating a file meanwhile would get the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` crash-safely: temp file in the same directory, fsync, rename.

    The file gets the mode a plain ``open(path, "w")`` would give it (0666 less the
    umask), not ``mkstemp``'s 0600: a store filled by one user (a batch job) is read by
    another (the server). An OSError names ``path``, not the temp file."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # a missing folder, no permission: named by the temp file
        exc.filename = str(path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename == tmp:
            exc.filename = str(path)
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def write_output(path, data: bytes) -> None:
    """``data`` into the file a user named (``encode(kv, path)``, ``-o``): new or a
    regular file, written crash-safely (:func:`atomic_write`) where it is, through any
    symlink; a device, FIFO or socket (``-o /dev/null``, ``-o /dev/stdout`` into a pipe,
    a FIFO a reader waits on), written into, a FIFO's reader waited for
    :data:`FIFO_WAIT_S` at most. The rename made each a regular file: as root,
    ``-o /dev/null`` replaced the system's /dev/null, and ``-o /dev/stdout`` its link."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # new (or unreachable: atomic_write names why)
        atomic_write(path, data)
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # a directory: atomic_write's error
        atomic_write(os.path.realpath(path) if stat.S_ISREG(mode) else path, data)
        return
    fd = _open_writer(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _open_writer(path) -> int:
    """A descriptor of the device or FIFO ``path`` to write to (a FIFO's open without
    O_NONBLOCK waits for a reader for good; with it, fails until one comes)."""
    deadline = time.monotonic() + FIFO_WAIT_S
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or not stat.S_ISFIFO(os.stat(path).st_mode):
                raise  # ENXIO: a socket (no file to write), or no reader yet
            if time.monotonic() >= deadline:
                raise OSError(errno.ETIMEDOUT, f"no reader came to the FIFO {path} in "
                                               f"{FIFO_WAIT_S:g} s") from None
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        return fd


def loads_json(data):
    """``json.loads`` of text or bytes kvcodec may not have written (a config, a header
    section, a store record): nesting too deep for Python's parser, whose RecursionError
    comes at ~1,000 levels (2 KB of ``[``), is a ``ValueError`` like any other malformed
    JSON, which is what callers catch."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply to parse") from None


def _nonblocking(path, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)  # regular files ignore it


def open_regular(path):
    """``open(path, "rb")`` where ``path`` is a regular file, else an ``OSError``
    (``EINVAL``) found before any read: opened non-blocking, since a FIFO's open blocks
    until a writer comes (a FIFO named like a config, a codebook or a store entry hung
    its reader for good); a device or a socket is no file of ours either."""
    f = open(path, "rb", opener=_nonblocking)
    try:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
    except BaseException:
        f.close()
        raise
    return f


def is_pipe(path) -> bool:
    """Whether ``path`` is a FIFO or a socket (False where it cannot be looked at:
    opening it says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


#: How long a named FIFO given as an input waits for its writer.
FIFO_WAIT_S = 30.0


def open_readable(path):
    """``open(path, "rb")``, waiting for a named FIFO's writer :data:`FIFO_WAIT_S` at
    most (its plain open waits for good: ``kvcodec inspect`` or ``encode`` of a FIFO
    nobody writes hung), then an ``OSError`` (``ETIMEDOUT``). A pipe given as a path
    (``<(curl ...)``) is read as it arrives."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # returns at once, writer or not
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            waiting = select.poll()  # readable once a writer wrote, or came and went
            waiting.register(fd, select.POLLIN)
            if not waiting.poll(int(FIFO_WAIT_S * 1000)):
                raise OSError(errno.ETIMEDOUT, "no writer came to this FIFO in "
                                               f"{FIFO_WAIT_S:g} s")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def text_over_limit(what, limit: int = MAX_TEXT_BYTES) -> ShapeError:
    return ShapeError(f"{what} is over {limit >> 20} MiB of text, more than a cache can "
                      "hold (2**24 tokens); split it")


def read_document(path, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of the text file at ``path``, reading at most ``limit`` of them: more is
    a ShapeError (a pipe or a device reads as text too, so it need not be a regular
    file)."""
    with open_readable(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise text_over_limit(path, limit)
    return data


def read_text(path, limit: int = MAX_TEXT_BYTES) -> str:
    """:func:`read_document` decoded as UTF-8, undecodable bytes replaced."""
    return read_document(path, limit).decode("utf-8", errors="replace")
