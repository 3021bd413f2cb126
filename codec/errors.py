"""Typed errors. Every failure a user can cause maps to one of these, with a message
that says what is wrong and what to do; the CLI prints the message without a traceback."""


class KVCodecError(Exception):
    """Base class of every error kvcodec raises on bad input or environment."""


class FormatError(KVCodecError):
    """The file is not a .kvc file, or is of an unsupported version."""


class VersionError(FormatError):
    """The file is a .kvc file of a format version this kvcodec does not read (a newer
    writer's): nothing is wrong with it, so a store never moves it aside."""


class CorruptError(FormatError):
    """The file's structure or a checksum does not match: it was damaged or tampered with."""


class TruncatedError(CorruptError):
    """The file or stream ended before the sizes its header promises."""


class ModelMismatchError(KVCodecError):
    """The cache was made by a different model than the one it is being loaded into."""


class ShapeError(KVCodecError):
    """Tensors have shapes, dtypes or counts that do not fit together."""


class ConfigError(KVCodecError):
    """A codec configuration is invalid."""


class CodebookError(ConfigError):
    """A config or file names a codebook (:mod:`kvcodec.core.codebook`) that is not here."""


class CalibrationError(ConfigError):
    """A calibration could not meet its quality target (no config was written)."""


class BackendError(KVCodecError):
    """A required backend (native extension, GPU, model package) is missing."""


class BlendError(KVCodecError):
    """Cached segments cannot be blended as asked (another anchor, computed in place
    elsewhere, no token ids to recompute a damaged segment from)."""


class AccessError(BackendError, OSError):
    """A file or store object could not be read or written (permissions, descriptors, I/O,
    network): the environment failed, nothing is known about the bytes. Also an
    ``OSError`` with the ``errno`` of the failure, so both kinds of handler see it."""
