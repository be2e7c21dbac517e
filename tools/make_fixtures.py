"""Build the test fixtures: the tiny offline model, a small demo dataset and its reference cache.

    python tools/make_fixtures.py [OUT_DIR]      # default: tests/fixtures

tests/test_fixtures.py rebuilds them into a temporary folder and fails if the committed ones are stale.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures"
DEMO_ROWS = 64


def fixture_config(root: Path) -> dict:
    """The config the fixture cache was built with (absolute paths under ``root``)."""
    return {
        "model_name_or_path": str(root / "tiny-model"), "quantization_bit": 4, "template": "auto",
        "dataset": "demo_case", "dataset_dir": str(root / "demo"), "cutoff_len": 128,
        "ref_cache_dir": str(root / "demo" / "ref_cache"), "output_dir": str(root / "demo" / "output"),
        "precompute_ref_batch_size": 8, "cache_part_rows": 16, "seed": 0,
    }


def build_inputs(out: Path) -> None:
    """The tiny model and the demo data."""
    from dpo_lean.tiny import write_demo_dataset, write_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    for sub in ("tiny-model", "demo"):
        shutil.rmtree(out / sub, ignore_errors=True)
    write_tiny_model(out / "tiny-model")
    write_demo_dataset(out / "demo", n=DEMO_ROWS, seed=1)


def build_cache(inputs: Path, cache_dir: Path, work_dir: Path) -> None:
    """The reference cache of ``inputs``' model and data, written to ``cache_dir`` (prepared data in ``work_dir``)."""
    from dpo_lean.config import from_dict
    from dpo_lean.precompute import run_precompute

    run_precompute(from_dict({**fixture_config(inputs), "ref_cache_dir": str(cache_dir), "output_dir": str(work_dir)}))
    (cache_dir / "_lock").unlink(missing_ok=True)


def build(out: Path) -> None:
    build_inputs(out)
    build_cache(out, out / "demo" / "ref_cache", out / "demo" / "output")
    shutil.rmtree(out / "demo" / "output", ignore_errors=True)  # prepared data and skip reports: not fixtures


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
