"""What identifies a cache (whole-file digests, hub snapshots, information vs compared fields) and the
temporary files of concurrent writers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import FIXTURES

from dpo_lean import cache, fingerprint, scoring, storage
from dpo_lean.fingerprint import fingerprint_diff, fingerprint_digest, model_fingerprint

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def _model_folder(path, weights: bytes):
    path.mkdir(parents=True)
    shutil.copy(FIXTURES / "tiny-model" / "config.json", path / "config.json")
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_a_same_size_reexport_in_the_same_folder_is_another_model(tmp_path):
    """Before: size + three 1 MiB samples (start, middle, end) of an 8 MiB file; a change at 2 MiB passed."""
    weights = bytearray(os.urandom(8 << 20))
    folder = _model_folder(tmp_path / "model", bytes(weights))
    first = model_fingerprint(str(folder))
    stat = (folder / "model.safetensors").stat()
    weights[(2 << 20) + 5] ^= 0xFF  # same size, same name, same folder
    (folder / "model.safetensors").write_bytes(bytes(weights))
    os.utime(folder / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even the same mtime
    second = model_fingerprint(str(folder))
    assert fingerprint_diff({"model": first}, {"model": second}) == [
        f"model.weights_sha256: {first['weights_sha256'][:12]}… -> {second['weights_sha256'][:12]}…"]


def test_a_file_is_hashed_once_and_a_corrupt_memo_is_harmless(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LEAN_CACHE_HOME", str(tmp_path / "memo"))
    data = os.urandom(3 << 20)
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert fingerprint.file_sha256(path) == want
    reads = []
    monkeypatch.setattr(fingerprint, "open", lambda *a, **k: reads.append(a) or open(*a, **k), raising=False)
    assert fingerprint.file_sha256(path) == want and reads == []  # remembered: not read again
    fingerprint.memo_path().write_text("{not json")
    assert fingerprint.file_sha256(path) == want and len(reads) == 1  # a corrupt memo: hashed again
    json.loads(fingerprint.memo_path().read_text())  # and the memo is whole again


def _fake_hub(root, repo: str, commit: str, files: dict[str, bytes], main: bool = True):
    """The huggingface_hub cache layout: blobs named by sha256, snapshot files symlinked to them, refs/main."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "blobs").mkdir(parents=True, exist_ok=True)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (base / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(f"../../blobs/{blob}")
    if main:
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(commit)
    return snap


def test_a_hub_file_is_identified_by_its_blob_sha256_without_reading_it(tmp_path, monkeypatch):
    data = os.urandom(1 << 20)
    snap = _fake_hub(tmp_path, "org/tiny", COMMIT_A, {"model.safetensors": data})
    monkeypatch.setattr(fingerprint, "open", lambda *a, **k: pytest.fail("read"), raising=False)
    assert fingerprint.file_sha256(snap / "model.safetensors") == hashlib.sha256(data).hexdigest()


def test_hub_revision_name_commit_sha_and_snapshot_folder_are_one_identity(tmp_path):
    config = (FIXTURES / "tiny-model" / "config.json").read_bytes()
    hub = tmp_path / "hub"
    snap = _fake_hub(hub, "org/tiny", COMMIT_A, {"config.json": config, "model.safetensors": b"w" * 100})
    by_name = model_fingerprint("org/tiny", "main", str(hub))
    by_commit = model_fingerprint("org/tiny", COMMIT_A, str(hub))
    by_folder = model_fingerprint(str(snap))
    for other in (by_commit, by_folder):
        assert fingerprint_diff({"model": by_name}, {"model": other}) == []
        assert fingerprint_digest({"model": by_name}) == fingerprint_digest({"model": other})
    assert by_name["commit"] == by_folder["commit"] == COMMIT_A
    assert (by_name["revision"], by_commit["revision"]) == ("main", COMMIT_A)  # recorded as given

    edited = json.loads(config) | {"rms_norm_eps": 1e-3}
    _fake_hub(hub, "org/tiny", COMMIT_B, {"config.json": json.dumps(edited).encode()}, main=False)
    diffs = fingerprint_diff({"model": by_name}, {"model": model_fingerprint("org/tiny", COMMIT_B, str(hub))})
    assert [d.split(":")[0] for d in diffs] == ["model.commit", "model.config_sha256"]


def test_library_versions_and_attention_kernel_are_recorded_not_compared(tiny_config, tmp_path):
    """A cache written here records the running versions (the committed fixture cache records whatever built it)."""
    from importlib.metadata import version

    import torch
    import transformers

    from dpo_lean.precompute import run_precompute

    config = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "written_here"), max_samples=4)
    run_precompute(config)
    manifest = cache.read_manifest(config.resolved_ref_cache_dir)
    runtime = manifest["fingerprint"]["runtime"]
    assert runtime["torch"] == torch.__version__ and runtime["transformers"] == transformers.__version__
    assert runtime["peft"] == version("peft") and runtime["bitsandbytes"] == version("bitsandbytes")
    assert runtime["flash_attn"] == "auto"
    other = json.loads(json.dumps(manifest["fingerprint"]))
    other["runtime"] = {"torch": "1.0", "transformers": "4.0", "peft": None, "bitsandbytes": None, "flash_attn": "fa2"}
    assert fingerprint_diff(manifest["fingerprint"], other) == []
    assert fingerprint_digest(other) == manifest["fingerprint_sha256"]


def test_the_tokenizer_digest_is_what_it_does_not_how_a_library_writes_it(monkeypatch):
    """Before: the digest hashed the backend's serialisation (backend_tokenizer.to_str()), so a tokenizers release
    that wrote the same tokenizer another way refused every cache made before it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURES / "tiny-model")
    before = fingerprint.tokenizer_fingerprint(tok)
    real = type(tok).backend_tokenizer

    class WrittenAnotherWay:
        def __init__(self, backend):
            self.backend = backend

        def to_str(self, *args, **kwargs):
            return json.dumps({"format": "next release", **json.loads(self.backend.to_str(*args, **kwargs))}, indent=1)

        def __getattr__(self, name):
            return getattr(self.backend, name)

    monkeypatch.setattr(type(tok), "backend_tokenizer", property(lambda self: WrittenAnotherWay(real.fget(self))))
    assert fingerprint.tokenizer_fingerprint(tok) == before
    monkeypatch.undo()
    tok.add_tokens(["<new_token>"])  # one more token: another tokenizer
    assert fingerprint.tokenizer_fingerprint(tok) != before


def test_cache_info_says_what_is_compared_and_what_is_information(tiny_config):
    from click.testing import CliRunner

    from dpo_lean.cli import main

    result = CliRunner().invoke(main, ["cache-info", str(tiny_config().resolved_ref_cache_dir)])
    assert result.exit_code == 0, result.output
    info = next(line for line in result.output.splitlines() if line.startswith("compared when reused"))
    for field in ("runtime.torch", "runtime.transformers", "runtime.flash_attn", "dataset.content_sha256",
                  "model.name_or_path", "model.revision"):
        assert field in info.split("information")[1], field


# ---------------------------------------------------------------- temporary files of concurrent writers


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_writers_temporary_part_survives_another_shards_open(tiny_config, tmp_path):
    """Before: open_for_writing removed every .part-*.tmp, so a shard starting late deleted another shard's
    part in the middle of its write."""
    config = tiny_config()
    cache_dir = config.resolved_ref_cache_dir
    manifest = cache.read_manifest(cache_dir)
    expected = cache._read_expected(cache_dir, manifest)
    host = storage.host()  # the host as it appears in temporary names
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = cache_dir / f".part-00001-0123456789.parquet.{host}.{writer.pid}.tmp"
        dead = cache_dir / f".part-00002-0123456789.parquet.{host}.{_dead_pid()}.tmp"
        elsewhere = cache_dir / f".part-00003-0123456789.parquet.otherhost.{writer.pid}.tmp"
        for path in (live, dead, elsewhere):
            path.write_bytes(b"PAR1 half a part")
        cache.open_for_writing(cache_dir, manifest["fingerprint"], expected, overwrite=False)  # another shard
        assert live.exists() and elsewhere.exists()  # a live writer's, and one whose host cannot be checked
        assert not dead.exists()  # its writer was killed: never complete, never read
    finally:
        writer.kill()
        writer.wait()


def test_each_writer_writes_its_part_under_a_name_of_its_own(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    fp = {"format_version": fingerprint.FORMAT_VERSION, "cutoff_len": 8}
    cache.open_for_writing(tmp_path, fp, {"r0": 0}, overwrite=False)
    seen, real = [], pq.write_table
    monkeypatch.setattr(pq, "write_table", lambda table, where, *a, **k: seen.append(where) or real(table, where))
    columns = {name: [0] for name in cache.SCHEMA.names} | {"id": ["r0"], "ids_sha256": ["x"]}
    cache.write_part(tmp_path, cache.part_name(0, ["r0"]), columns, fp)
    assert seen[0].name.endswith(f".{os.getpid()}.tmp") and f".{storage.host()}." in seen[0].name
    assert cache.scan(tmp_path).complete


def test_a_cache_made_from_a_hub_id_serves_its_commit_and_its_snapshot_folder(tiny_config, tmp_path):
    """Before: `main` vs its commit sha (model.revision) and the hub id vs its snapshot folder (model.commit)
    were refused as different models. The tiny model in a hub cache layout, offline."""
    from dpo_lean.precompute import run_precompute

    hub = tmp_path / "hub"
    files = {p.name: p.read_bytes() for p in (FIXTURES / "tiny-model").iterdir()}
    snap = _fake_hub(hub, "org/tiny", COMMIT_A, files)
    run = dict(copy_cache=False, ref_cache_dir=str(tmp_path / "cache"), max_samples=8, cache_dir=str(hub))
    assert run_precompute(tiny_config(model_name_or_path="org/tiny", **run))["rows"] == 8
    for name, revision in (("org/tiny", COMMIT_A), (str(snap), "main")):
        ref = scoring.prepare_run(tiny_config(model_name_or_path=name, model_revision=revision, **run))[3]
        assert len(ref) == 8, name


class _ReadRecorder:
    """A config that notes every key read from it."""

    def __init__(self, config):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "read", set())

    def __getattr__(self, key):
        self.read.add(key)
        return getattr(self._config, key)


@pytest.mark.parametrize("extra", [{}, {"quantization_bit": 4, "double_quantization": False, "ref_precision": "fp32"},
                                   {"ref_model": str(FIXTURES / "tiny-model"), "ref_model_quantization_bit": 4}])
def test_every_key_the_fingerprint_reads_is_declared_so_a_sweep_refuses_to_vary_it(tmp_path, extra):
    """sweep.CACHE_KEYS is fingerprint.identity_keys(): a key the fingerprint's builders read but IDENTITY_KEYS
    does not declare would let a sweep vary what its shared cache was computed with."""
    from dpo_lean import modeling, sweep
    from dpo_lean.config import from_dict
    from dpo_lean.data.pipeline import prepare_data
    from dpo_lean.data.templates import template_for

    config = from_dict({"model_name_or_path": str(FIXTURES / "tiny-model"), "dataset": "demo_case",
                        "dataset_dir": str(FIXTURES / "demo"), "output_dir": str(tmp_path), **extra})
    tokenizer = modeling.load_tokenizer(config)
    data = prepare_data(config, tokenizer)
    recorder = _ReadRecorder(config)
    reference = modeling.reference_spec(recorder)
    fingerprint.build_fingerprint(recorder, tokenizer, data, reference)
    modeling.load_tokenizer(recorder)
    template_for(recorder, tokenizer)
    undeclared = recorder.read - fingerprint.identity_keys() - fingerprint.READ_NOT_COMPARED
    assert not undeclared
    assert {"cutoff_len", "template", "model_name_or_path", "ref_precision"} <= recorder.read  # it saw the reads
    assert sweep.CACHE_KEYS == fingerprint.identity_keys()
