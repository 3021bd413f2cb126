"""What a job stores and how documents are cut and grouped: :class:`JobSpec`, windows,
batches.

Windows
    A document longer than the model's context (or ``max_tokens``) is cut into windows
    of ``W`` tokens, ``W`` the largest multiple of the store's chunk size that fits (a
    window then ends on a chunk boundary, so no chunk straddles two windows), the last
    window taking the rest. Each window is stored as a sequence of its own: as a prompt
    prefix (a request that starts with that window reuses it), as an independent
    document for blending, or as one evicted entry. A prompt starts the way the model's
    tokenizer starts it (:mod:`kvcodec.models.tokens`), so where that is a BOS every
    prefix window starts with it too: ``W`` tokens are the BOS and ``W - 1`` of text.
    Attention cannot reach across a window; a document that should be one prefix needs a
    model with a longer context.

Batches
    Windows that need a prefill are grouped into forward passes of at most
    ``batch_tokens`` padded tokens (rows x longest row). A batcher holds up to
    ``LOOKAHEAD`` windows and sorts them by length before cutting batches, so rows of a
    batch have similar lengths and little padding. Batching does not change the stored
    bytes (:func:`kvcodec.models.batch.capture_batch` makes every row's KV independent
    of its batch), so any runner, any batch size and any resume point give the same
    store.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..core.config import load_config
from ..errors import ConfigError

LOOKAHEAD = 64  # windows the batcher sorts by length before cutting batches


@dataclass(frozen=True)
class JobSpec:
    """What a precompute job writes (everything that decides the stored bytes).

    Parameters
    ----------
    configs : tuple of str
        Codec configs (names or JSON paths); one set of entries per config, best first.
    independent : bool
        Store windows as position-independent documents (behind the model's anchor) for
        :mod:`kvcodec.blend`, instead of prompt prefixes.
    evict : str or None
        ``"POLICY:RATIO"``: store each window evicted (:mod:`kvcodec.evict`), one entry
        per window.
    max_tokens : int or None
        Longest window; default (and cap) the model's context.
    batch_tokens : int
        Padded tokens per forward pass.
    chat : bool
        Store each document as the start of a chat turn (the tokenizer's chat template,
        after a ``system`` turn if given), as a chat request about it begins.
    system : str or None
        With ``chat``: the system message.
    salt : str or None
        The tenant's salt (vLLM's ``cache_salt``), part of every entry's key
        (:class:`~kvcodec.store.ChunkStore`): only requests of that salt hit them.
    max_bytes, ttl : int or None, float or None
        The store's capacity and age limit while the job writes (least recently used
        entries evicted, :mod:`kvcodec.store.capacity`); not part of the job's identity.
    """

    configs: tuple = ("default",)
    independent: bool = False
    evict: str | None = None
    max_tokens: int | None = None
    batch_tokens: int = 4096
    chat: bool = False
    system: str | None = None
    salt: str | None = field(default=None, repr=False)  # a secret: kept out of reprs
    max_bytes: int | None = None
    ttl: float | None = None

    def __post_init__(self):
        configs = (self.configs,) if isinstance(self.configs, str) else self.configs  # not
        if not isinstance(configs, (tuple, list)) or not all(  # its letters, one by one
                isinstance(c, str) and c for c in configs):
            raise ConfigError(f"configs must be config names (a list of str), got "
                              f"{self.configs!r:.60}")
        object.__setattr__(self, "configs", tuple(configs) or ("default",))
        for name in ("independent", "chat"):
            if not isinstance(getattr(self, name), bool):  # "no" was true
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("system", "salt"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a str or None, not a "
                                  f"{type(getattr(self, name)).__name__}")
        if self.evict is not None and self.independent:
            raise ConfigError("an evicted window keeps only some tokens of each head, and "
                              "blending needs every token: choose --evict or --independent")
        if self.evict is not None:
            from ..evict import parse

            parse(self.evict)
        if self.system is not None and not self.chat:
            raise ConfigError("a system message goes with chat (--chat)")
        if self.chat and self.independent:
            raise ConfigError("a position-independent document is placed inside a prompt: "
                              "it cannot carry a chat template (choose --chat or --independent)")
        from ..store.capacity import Policy

        Policy(self.max_bytes, self.ttl)  # checked before any work
        for name, v in (("max_tokens", self.max_tokens), ("batch_tokens", self.batch_tokens)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

    @property
    def mode(self) -> str:
        return "evicted" if self.evict else "independent" if self.independent else "prefix"

    def window(self, context: int | None, chunk_tokens: int, anchor_tokens: int = 0) -> int:
        """The window size ``W`` for a model of ``context`` positions (see module doc)."""
        limits = [v for v in (self.max_tokens, context) if v]
        if not limits:
            return 1 << 30
        room = min(limits) - anchor_tokens
        if room < 1:
            raise ConfigError(f"max_tokens {min(limits)} leaves no room after the "
                              f"{anchor_tokens}-token anchor")
        return room // chunk_tokens * chunk_tokens or room

    def key(self, fingerprint: dict, window: int, prefix=(), resolve=None) -> str:
        """The identity of what this job stores for a document: the manifest's namespace.
        ``prefix``: the tokens every window starts with (the tokenizer's BOS);
        ``resolve(config, fingerprint)``: how a config name becomes the config (default
        :func:`load_config`; a store's jobs: :meth:`ChunkStore.store_config`, which
        knows the ``klt`` fit it keeps)."""
        resolve = resolve or (lambda c, fp: load_config(c, model=fp))
        configs = [resolve(c, fingerprint) for c in self.configs]
        what = [fingerprint, configs, self.mode, self.evict, window]
        # Only where they change the stored tokens, so that older manifests stay valid.
        if prefix:
            what.append({"prefix": list(prefix)})
        if self.chat:
            what.append({"chat": True, "system": self.system})
        if self.salt is not None:
            what.append({"salt": self.salt})
        blob = json.dumps(what, sort_keys=True).encode()
        return hashlib.sha256(b"kvcodec-job-v1" + blob).hexdigest()


def windows(token_ids: list, size: int, prefix=()) -> list:
    """``token_ids`` cut into consecutive windows of ``size`` tokens (the last shorter).

    ``prefix`` (the tokenizer's BOS), which ``token_ids`` start with, starts every window:
    each holds ``size - len(prefix)`` of the other tokens after it.
    """
    prefix = list(prefix)
    if not prefix or token_ids[:len(prefix)] != prefix:
        return [token_ids[i:i + size] for i in range(0, len(token_ids), size)]
    rest, step = token_ids[len(prefix):], size - len(prefix)
    if step < 1:
        raise ConfigError(f"a window of {size} tokens has no room after the "
                          f"{len(prefix)}-token prefix")
    return [prefix + rest[i:i + step] for i in range(0, max(len(rest), 1), step)]


def batches(items: list, length, batch_tokens: int) -> list:
    """``items`` sorted by ``length(item)`` (longest first, stable) and cut into groups
    whose rows x longest row stays within ``batch_tokens`` (a longer item goes alone)."""
    order = sorted(items, key=length, reverse=True)
    out, group, width = [], [], 0
    for item in order:
        n = length(item)
        w = max(width, n)
        if group and w * (len(group) + 1) > batch_tokens:
            out.append(group)
            group, w = [], n
        group.append(item)
        width = w
    if group:
        out.append(group)
    return out
