"""What proves a store entry damaged, and the check that an entry is the chunk its key
names."""
from __future__ import annotations

from ..errors import CorruptError, FormatError, ModelMismatchError, VersionError
from ..models.fingerprint import check_fingerprint


def is_damage(exc: BaseException) -> bool:
    """Whether ``exc``, raised reading an entry, proves its bytes wrong: a checksum, the
    container's structure, another model's or other tokens' entry (:class:`FormatError`,
    of which :class:`CorruptError`), but not a newer format version, nor anything of the
    environment (``OSError``, a missing backend)."""
    return isinstance(exc, FormatError) and not isinstance(exc, VersionError)


def check_entry(f, loc, ids: list, t0: int, anchor, fp: dict) -> None:
    """Raise :class:`CorruptError` unless the open entry ``f`` at ``loc`` is the chunk of
    ``ids`` starting at token ``t0`` (behind ``anchor``) made by the model of ``fp``."""
    try:
        check_fingerprint(f.model, fp)
    except ModelMismatchError as exc:
        raise CorruptError(f"{loc} holds another model's entry: {exc}") from None
    if (f.num_layers, f.num_kv_heads, f.head_dim) != (
            fp["num_layers"], fp["num_kv_heads"], fp["head_dim"]):
        raise CorruptError(f"{loc} holds {f.num_layers} layers x {f.num_kv_heads} KV "
                           f"heads x head_dim {f.head_dim}, not the {fp['num_layers']} x "
                           f"{fp['num_kv_heads']} x {fp['head_dim']} its key's model has")
    anchor = None if anchor is None else [int(t) for t in anchor]
    if (f.num_tokens != len(ids) or f.position_offset != len(anchor or ()) + t0
            or f.anchor != anchor
            or (f.token_ids is not None and f.token_ids != ids)):
        raise CorruptError(f"{loc} holds other tokens than its key says")


def entry_limit(fingerprint: dict, n_tokens: int) -> int:
    """The most bytes an entry of ``n_tokens`` tokens can take (8 per element, twice
    lossless fp32, and 16 MiB of header and tables): larger is refused unfetched."""
    fp = fingerprint
    per_token = 2 * fp["num_layers"] * fp["num_kv_heads"] * fp["head_dim"]
    return 8 * per_token * max(1, n_tokens) + (16 << 20)
