"""Shared test fixtures: the committed tiny model, demo data and reference cache (tests/fixtures)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_DEMO = ROOT.parent / "shared" / "data" / "dpo_en_demo.json"
sys.path.insert(0, str(ROOT / "tools"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# file digests are remembered here, not in the user's ~/.cache/dpo_lean (subprocesses inherit it)
os.environ.setdefault("DPO_LEAN_CACHE_HOME", tempfile.mkdtemp(prefix="dpo_lean_memo_"))

from make_fixtures import fixture_config  # noqa: E402


def _fixture_files() -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(FIXTURES)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(FIXTURES.rglob("*")) if p.is_file()}


def pytest_sessionstart(session):
    session.config._fixture_files = _fixture_files()


def pytest_sessionfinish(session, exitstatus):
    """Tests read the committed fixtures and never write there (a write would leave the checkout dirty and the
    next run testing something else): a changed, added or removed file fails the run, naming it."""
    before, after = getattr(session.config, "_fixture_files", None), _fixture_files()
    if before is None or before == after:
        return
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"tests changed files under tests/fixtures (write to tmp_path instead): {changed[:5]}", red=True)
    session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests skip, with one reason, where there is no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false); tools/gpu_check.sh runs it")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: the fixture config with output in tmp_path and a private copy of the reference cache."""
    from dpo_lean.config import from_dict

    def make(copy_cache: bool = True, **overrides):
        raw = fixture_config(FIXTURES)
        raw["output_dir"] = str(tmp_path / "output")
        if copy_cache:
            cache = tmp_path / "ref_cache"
            if not cache.exists():
                shutil.copytree(FIXTURES / "demo" / "ref_cache", cache)
            raw["ref_cache_dir"] = str(cache)
        raw.update(overrides)
        return from_dict(raw)

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURES / "tiny-model")


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny-model runs: with models this small, the second thread costs more in
    synchronisation than it saves (the family matrix ran 3x faster on one thread on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory):
    """(log history, output_dir) of the 1-process run that the 2-process runs (DDP, FSDP) must equal."""
    from launching import run_one_process

    return run_one_process(tmp_path_factory.mktemp("one_process"))
