"""Fuzz the GGUF header check that runs before transformers is given a model file.

    python fuzz/fuzz_gguf.py [libFuzzer flags] CORPUS_DIR...   (make fuzz runs it)

An input is a GGUF file: its header is parsed within bounds (counts, lengths, types,
dimensions, tensor data inside the file) and checked to hold the model its metadata
names (``kvcodec.models.gguf_header``). Passing or a BackendError are the answers; the
budget is the input's size (the check reads the header and keeps only its scalars).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

with common.instrumented(__name__ == "__main__"):
    from kvcodec.models import gguf_header  # noqa: E402

# parse_header imports gguf's constants on its first call; importing the gguf package
# grows RSS by ~46-64 MiB, which would be charged to the first input's 64 MiB budget (a
# CI run failed on its first seed that way), so it is imported here, before any input.
import gguf.constants  # noqa: E402,F401


def target(data: bytes, budget: common.Budget) -> None:
    head = gguf_header.parse_header(data)
    gguf_header.check_model(head, gguf_header.Path("fuzz.gguf"))


TestOneInput = common.harness(target)

if __name__ == "__main__":
    common.main(TestOneInput)
