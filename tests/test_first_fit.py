"""The first-encode fit: ``"klt"`` for a model with no klt config fits bases on the first
long enough cache it encodes (no model run), keeps them for later caches and processes,
and never leaves a file its reader cannot decode."""
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.core import codebook
from kvcodec.core.config import calibrated_config_path, load_config, model_key
from kvcodec.core.fit import FIRST_FIT, FIRST_FIT_STEPS, FIRST_FIT_TOKENS, first_fit, klt_config
from kvcodec.errors import ConfigError, ShapeError
from kvcodec.format import Encoder, container, io as kvio
from kvcodec.format.encoder import codebooks
from kvcodec.store import ChunkStore


@pytest.fixture
def other(kv_600, tmp_path, monkeypatch):
    """The embedded model's cache as another checkpoint of it (no config calibrated for
    it, so ``"klt"`` is not shipped), with an empty user config directory."""
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "configs"))
    codebook.clear()
    yield dataclasses.replace(kv_600, model={**kv_600.model, "weights_hash": "f" * 64})
    codebook.clear()


def _config(data: bytes) -> dict:
    with kvcodec.open(data) as f:
        return f.meta.config


def _relative_error(out, kv) -> float:
    num = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in zip(out.keys, kv.keys))
    return num / sum(float(b.float().pow(2).sum()) for b in kv.keys)


def test_klt_is_fitted_on_the_first_long_cache_and_kept_for_the_next(other, tmp_path):
    fp = other.model
    with pytest.raises(ConfigError, match="klt configs are per model"):
        load_config("klt", model=fp)
    enc = Encoder("klt", fp)
    assert enc.fit_pending
    short = enc.encode(other.slice(0, FIRST_FIT_TOKENS - 1))  # too few rows to fit
    assert enc.fitted is None and _config(short)["name"] == "default" and enc.fit_pending
    assert not (tmp_path / "configs").exists()

    data = enc.encode(other)
    cfg = _config(data)
    assert not enc.fit_pending
    assert enc.fitted == tmp_path / "configs" / f"klt-{cfg['model_key']}.json"
    assert cfg["name"] == "klt" and cfg["fitted"] == FIRST_FIT and cfg["fit_tokens"] == 600
    with kvcodec.open(data) as f:
        assert f.meta.summary()["format_version"] == container.TRANSFORM_VERSION
        assert "codebook" not in f.meta.summary()["sections"]  # named, kept in the folder
    [digest] = codebooks(cfg)
    assert (tmp_path / "configs" / "codebooks" / f"{digest}.kvcb").is_file()
    default = kvcodec.encode(other, config="default")
    out = kvcodec.decode(data)
    assert len(data) < 0.95 * len(default)  # fewer bits in the bases of this very cache
    assert _relative_error(out, other) <= 1.2 * _relative_error(kvcodec.decode(default), other)

    # Later encoders (and processes) find the fit by name; "default" stays model-free.
    codebook.clear()
    again = Encoder("klt", fp)
    assert again.fitted is None and again.config["fitted"] == FIRST_FIT
    assert again.encode(other) == enc.encode(other)
    assert "fitted" not in load_config("default", model=fp)
    # A store of that config keeps the codebook its entries name.
    store = ChunkStore(tmp_path / "s", fp, config="klt")
    assert store.put(other) == 3
    assert store.read_object(f"codebooks/{digest}.kvcb") == codebook.get(digest).to_bytes()
    # A calibration of the model wins over the fit, wherever its file sorts.
    calibrated = tmp_path / "configs" / "zz-calibrated.json"
    calibrated.write_text(json.dumps({k: v for k, v in cfg.items() if k != "fitted"}))
    assert calibrated_config_path(fp, "klt") == calibrated
    assert calibrated_config_path(fp, "default") == calibrated  # any calibration of it


def test_a_fit_that_cannot_be_kept_travels_in_its_files(other, tmp_path, monkeypatch,
                                                        caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(blocked / "configs"))
    enc = Encoder("klt", other.model)
    with caplog.at_level(logging.WARNING, logger="kvcodec"):
        data = enc.encode(other)
    assert enc.fitted is None and enc.embed_codebook
    assert "cannot keep the klt fit" in caplog.text
    assert list(tmp_path.iterdir()) == [blocked]  # no partial file anywhere
    codebook.clear()  # another process: the file carries what it needs
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "elsewhere"))
    with kvcodec.open(data) as f:
        assert f.meta.summary()["sections"]["codebook"] > 0
        assert _relative_error(f.decode(), other) < 0.05


def test_a_first_fit_codes_keys_finer_and_values_coarser_than_its_base(other):
    """In the bases, the base's steps cost keys more than values (SmolLM2's perplexity
    +1.25% over 3 x 1,024 tokens at them, +0.53% with these): every layer's key step is
    the base's x0.9 and its value step x1.15; the bases are the same."""
    base = load_config("default", model=other.model)
    plain, plain_book = klt_config(base, [other])
    cfg, book = first_fit(other, base)
    assert all((book.basis(i) == plain_book.basis(i)).all() for i in range(book.count))
    assert FIRST_FIT_STEPS["key"] < 1 < FIRST_FIT_STEPS["value"]
    for kind, factor in FIRST_FIT_STEPS.items():
        got = [r["quantizer"]["step"] for r in cfg[kind]]
        want = [factor * r["quantizer"]["step"] for r in plain[kind]]
        assert len(got) == other.num_layers and got == pytest.approx(want, rel=1e-5)
    assert "keys x0.9, values x1.15" in cfg["description"]


def test_what_a_first_fit_does_not_take(other, kv_600):
    base = load_config("default")
    assert first_fit(other.slice(0, FIRST_FIT_TOKENS - 1), base) is None
    assert first_fit(kvcodec.evict.evict(other, "knorm", 0.5), base) is None
    assert first_fit(dataclasses.replace(other, model=None), base) is None
    with pytest.raises(ConfigError, match="no rate curve"):
        Encoder("klt", other.model, target_kl=0.01)
    with pytest.raises(ConfigError, match="klt configs are per model"):
        Encoder("klt")  # no model to fit for
    # A calibration of the model wins: the embedded model's shipped klt, no fit.
    assert Encoder("klt", kv_600.model).config.get("fitted") is None
    bad = other.slice(0, 300)
    bad.keys[4] = bad.keys[4].clone()
    bad.keys[4][0, 1, 7, 3] = float("nan")
    assert first_fit(bad, base) is None
    with pytest.raises(ShapeError, match="keys of layer 4 contain NaN"):
        Encoder("klt", other.model).encode(bad)  # the error any config gives, no fit
    # An evicted first cache is coded with the base config, and the fit waits.
    enc = Encoder("klt", other.model)
    assert _config(enc.encode(kvcodec.evict.evict(other, "knorm", 0.5)))["name"] == "default"
    assert enc.fitted is None


def test_cli_encode_reports_the_fit(other, tmp_path):
    from kvcodec_cli.main import main

    src = tmp_path / "kv.safetensors"
    kvio.save_safetensors(other, src)
    short = tmp_path / "short.safetensors"
    kvio.save_safetensors(other.slice(0, 100), short)
    r = CliRunner().invoke(main, ["encode", str(short), "-o", str(tmp_path / "s.kvc"),
                                  "--config", "klt"])
    assert r.exit_code == 0 and "these 100 tokens do not fit one" in r.output, r.output
    assert _config((tmp_path / "s.kvc").read_bytes())["name"] == "default"
    r = CliRunner().invoke(main, ["encode", str(src), "-o", str(tmp_path / "a.kvc"),
                                  "--config", "klt"])
    assert r.exit_code == 0, r.output
    assert "fitted one on these 600 tokens, kept as" in r.output
    r = CliRunner().invoke(main, ["encode", str(src), "-o", str(tmp_path / "b.kvc"),
                                  "--config", "klt"])
    assert r.exit_code == 0 and "fitted" not in r.output
    assert (tmp_path / "a.kvc").read_bytes() == (tmp_path / "b.kvc").read_bytes()
    # Where the fit is not kept, a file that names it is a clear error; here it decodes.
    codebook.clear()
    r = CliRunner(env={"KVCODEC_CONFIG_DIR": str(tmp_path / "elsewhere")}).invoke(
        main, ["decode", str(tmp_path / "a.kvc"), "-o", str(tmp_path / "a.safetensors")])
    assert r.exit_code != 0 and "Traceback" not in r.output and "codebook" in r.output
    assert kvcodec.decode(tmp_path / "a.kvc").num_tokens == 600  # from the kept folder


def test_a_store_keeps_the_fit_so_every_machine_codes_and_keys_alike(other, kv_600,
                                                                     tmp_path, monkeypatch):
    fp, ids = other.model, other.token_ids
    root = tmp_path / "s"
    with pytest.raises(ConfigError, match="klt configs are per model"):
        ChunkStore(root, fp, config="klt")  # no fit anywhere yet
    Encoder("klt", fp).encode(other)  # machine A fits on its first cache
    a = ChunkStore(root, fp, config="klt")
    assert a.config["fitted"] == FIRST_FIT and a.put(other) == 3
    [digest] = codebooks(a.config)
    rel = f"configs/klt-{a.config['model_key']}.json"
    assert codebooks(json.loads(a.read_object(rel))) == [digest]
    want = kvcodec.decode(kvcodec.encode(other.slice(0, 256), config=a.config))

    # Machine B has no fit of its own, machine C another one: both take the store's.
    for machine, fit_on in (("b", None), ("c", other.slice(0, 300))):
        monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / machine))
        codebook.clear()
        if fit_on is not None:
            Encoder("klt", fp).encode(fit_on)
            assert codebooks(load_config("klt", model=fp)) not in ([], [digest])
        b = ChunkStore(root, fp, config="klt")
        assert codebooks(b.config) == [digest] and b.keys(ids) == a.keys(ids)
        got = b.load_prefix(ids)  # the store's codebook, loaded from the store
        assert got.num_tokens == 512 and torch.equal(got.keys[7][:, :, :256], want.keys[7])

    # A damaged kept fit is moved aside; this machine's own fit then serves, and is kept.
    a.write_object(rel, b'{"name": "klt", "key": ')
    c = ChunkStore(root, fp, config="klt")
    name = rel.split("/")[1]
    assert sorted(p.name for p in (root / "configs").iterdir()) == [name, f"{name}.bad"]
    assert codebooks(c.config) not in ([], [digest])
    assert codebooks(json.loads(c.read_object(rel))) == codebooks(c.config)
    # A calibration wins over any fit: the embedded model's shipped klt, nothing kept.
    shipped = ChunkStore(tmp_path / "t", kv_600.model, config="klt")
    assert not shipped.config.get("fitted") and not (tmp_path / "t" / "configs").exists()


def test_a_corpus_job_of_klt_fits_on_its_first_document_and_keeps_it_in_the_store(
        other, lm, texts, tmp_path, monkeypatch):
    from kvcodec.jobs import JobSpec, precompute
    from kvcodec.jobs import engine as engine_mod

    monkeypatch.setattr(lm, "fingerprint", other.model)  # another checkpoint's caches
    docs = []
    for name, n in (("gpl3", 3000), ("python_license", 2000)):
        docs.append(str(tmp_path / f"{name}.txt"))
        Path(docs[-1]).write_text(texts[name][:n])
    spec = JobSpec(configs=("klt",), batch_tokens=1024)
    # No klt anywhere: the job fits one on its first document, keeps it, and uses it.
    s = precompute(docs, tmp_path / "s", model=lm, progress=False, spec=spec)
    fitted = load_config("klt", model=other.model)
    assert fitted["fitted"] == FIRST_FIT and fitted["fit_tokens"] == len(
        lm.tokenizer(texts["gpl3"][:3000])["input_ids"])
    assert s.done == 2 and s.chunks_new > 0
    store = ChunkStore(tmp_path / "s", other.model, config="klt")
    assert codebooks(store.config) == codebooks(fitted)
    assert len(list(store.entries())) == s.chunks_new
    # Machine B, no fit of its own: the same job finds its manifest and prefills nothing.
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "b"))
    codebook.clear()

    def no_prefill(*a, **k):
        raise AssertionError("a stored document was prefilled again")

    monkeypatch.setattr(engine_mod, "capture_batch", no_prefill)
    again = precompute(docs, tmp_path / "s", model=lm, progress=False, spec=spec)
    assert (again.already_stored, again.chunks_new) == (2, 0)


def test_a_ray_job_of_klt_without_a_fit_is_refused_before_it_starts(other, tmp_path,
                                                                    monkeypatch):
    import sys

    from kvcodec.jobs import JobSpec, precompute

    module = sys.modules["kvcodec.models.fingerprint"]  # (a function of that name too)
    monkeypatch.setattr(module, "fingerprint_dir", lambda path: other.model)
    doc = tmp_path / "doc.txt"
    doc.write_text("a document")
    with pytest.raises(ConfigError, match="on Ray, fit it first"):
        precompute([str(doc)], tmp_path / "s", runner="ray", progress=False,
                   spec=JobSpec(configs=("klt",)))
    Encoder("klt", other.model).encode(other)  # a fit now exists: nothing to refuse
    from kvcodec.jobs.runner import _check_klt

    _check_klt(None, tmp_path / "s", None)


@pytest.mark.parametrize("crafted", [b"[" * 100_000, b" " * (17 << 20), b"\xff\xfe",
                                     b'{"name": "klt", "key": 3}', b"[]"])
def test_a_crafted_kept_fit_is_moved_aside_not_raised(other, tmp_path, crafted):
    """Whatever a store's configs/klt-*.json holds, opening the store reads it within
    bounds and moves it aside; with no fit of its own, the clear ConfigError follows."""
    store = ChunkStore(tmp_path / "s", other.model)  # (a default store: writes the object)
    rel = f"configs/klt-{model_key(other.model)}.json"
    store.write_object(rel, crafted)
    with pytest.raises(ConfigError, match="klt configs are per model"):
        ChunkStore(tmp_path / "s", other.model, config="klt")
    assert not store.exists_object(rel) and list((tmp_path / "s" / "configs").glob("*.bad"))


def test_a_fit_kept_in_an_s3_store_serves_another_machine(other, s3_endpoint, tmp_path,
                                                          monkeypatch):
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    url, fp = "s3://kvtest/first-fit", other.model
    Encoder("klt", fp).encode(other)
    a = ChunkStore(url, fp, config="klt", storage_options=options)
    assert a.put(other) == 3
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "b"))
    codebook.clear()
    b = ChunkStore(url, fp, config="klt", storage_options=options)
    assert codebooks(b.config) == codebooks(a.config) and b.keys(other.token_ids) == a.keys(
        other.token_ids)
    assert b.load_prefix(other.token_ids).num_tokens == 512


def test_two_machines_putting_their_fits_at_once_end_on_the_same(other, tmp_path,
                                                                 monkeypatch):
    """Machine A puts its fit into a store that has none, and machine B's lands right
    after: A codes with B's (the store's), not with its own."""
    from kvcodec.store import backends

    fp = other.model
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "b"))
    Encoder("klt", fp).encode(other.slice(0, 300))  # machine B's fit
    theirs = load_config("klt", model=fp)
    book_b = codebook.get(codebooks(theirs)[0])
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "a"))
    Encoder("klt", fp).encode(other)  # machine A's, another codebook
    assert codebooks(load_config("klt", model=fp)) != codebooks(theirs)
    write = backends.LocalBackend.write

    def racing(self, rel, data):
        write(self, rel, data)
        if rel.startswith("configs/"):  # B's lands just after A's
            write(self, f"codebooks/{book_b.digest}.kvcb", book_b.to_bytes())
            write(self, rel, json.dumps(theirs).encode())

    monkeypatch.setattr(backends.LocalBackend, "write", racing)
    a = ChunkStore(tmp_path / "s", fp, config="klt")
    assert codebooks(a.config) == codebooks(theirs)
