"""Blend: fuse separately cached segments (RAG documents, chat turns) into one cache for
a new prompt, with position correction and selective recompute (CacheBlend, Yao et al.
EuroSys 2025, with an exact per-token causal mask and pluggable selectors).

    from kvcodec.blend import Cached, Text, blend, generate
    result = blend(lm, [Text(system), Cached("doc1.kvc"), Cached("doc2.kvc"),
                        Text(question)], recompute=0.15, selector="hkvd")
    result.cache        # a transformers cache of the whole prompt
    print(result.report.summary())

Documents are cached position-independently behind a fixed anchor
(``capture_kv(lm, text, anchor=default_anchor(lm.tokenizer))``, ``kvcodec encode
--independent``, ``kvcodec precompute --independent``). Built on the decoded tensors;
below ``integrations`` (whose vLLM connector blends with its selectors; may import every
layer below it).
"""
from ..errors import BlendError
from .api import (CHECK_LAYER, RECOMPUTE, BlendReport, BlendResult, blend, compare_with_prefill,
                  generate)
from .segments import Cached, SegmentReport, Text
from .selectors import SELECTORS, Context, Selector, get_selector

__all__ = ["CHECK_LAYER", "RECOMPUTE", "BlendError", "BlendReport", "BlendResult", "blend",
           "generate", "compare_with_prefill", "Cached", "SegmentReport", "Text", "SELECTORS",
           "Context", "Selector", "get_selector"]
