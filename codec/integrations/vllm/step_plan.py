"""What one layer group of a vLLM step decodes: the entries of every load, each distinct
entry once. Requests of the same step that share a document (a system prompt, a
popular RAG chunk, the same file asked different questions) read the same store entries;
each entry is decoded once per step and its rows are written into every request's
blocks."""
from __future__ import annotations

from ...store.batch import Document


def plan_group(jobs: list, group: list, pool):
    """``jobs``: ``(load, files)`` per load of the step, ``files`` its opened entries
    ``(file or None, first token, path, run)`` (a None file: not loaded, nor any after
    it). Returns ``(owners, docs, where, bufs)``: ``owners`` the runs to write, ``(load,
    files, first, end)``; ``docs`` the :class:`~kvcodec.store.batch.Document` s to decode
    into ``bufs`` (``{layer: (keys, values)}`` from ``pool``); ``where[i]`` per entry of
    owner ``i`` the ``(document, entry)`` that decodes it. An entry another run of the
    step holds (the same path, and for a blended document the same position) is decoded
    once: the runs of new entries in between become documents of their own."""
    owners = []
    for load, files in jobs:
        if load.recompute is not None and max(group) < load.recompute.check_layer:
            continue  # layers vLLM computes for every token
        n = next((i for i, e in enumerate(files) if e[0] is None), len(files))
        i = 0
        while i < n:
            j = i + 1
            while j < n and files[j][3] is files[i][3]:
                j += 1
            owners.append((load, files, i, j))
            i = j
    if not owners:
        return owners, [], [], {}
    planned, seen, where = [], {}, [None] * len(owners)

    def plan(new: list) -> list:  # new: (entry, key) of a run of entries not seen yet
        seen.update((key, (len(planned), j)) for j, (_, key) in enumerate(new))
        planned.append([e for e, _ in new])
        return [(len(planned) - 1, j) for j in range(len(new))]

    for o, (_, files, a, b) in enumerate(owners):
        anchored = files[a][3].anchor is not None  # rotated to where it lands
        where[o], new = [], []
        for e in files[a:b]:
            key = (str(e[2]), e[1] if anchored else None)
            if key in seen:
                where[o] += plan(new) if new else []
                new = []
                where[o].append(seen[key])
            else:
                new.append((e, key))
        where[o] += plan(new) if new else []
    bufs = pool.views(group, sum(e[0].num_tokens for run in planned for e in run))
    docs, row = [], 0
    for run in planned:
        spans = []
        for e in run:
            spans.append((row, row + e[0].num_tokens))
            row += e[0].num_tokens
        docs.append(Document([e[0] for e in run], [e[2] for e in run], bufs, spans,
                             run[0][1] if run[0][3].anchor is not None else None))
    return owners, docs, where, bufs
