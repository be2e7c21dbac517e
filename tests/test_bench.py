"""tools/bench.py data: it runs end to end and prints the issue-15 ratios, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dpo_lean.tiny import demo_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_data  # noqa: E402


def test_resample_makes_every_copy_unique_and_keeps_the_source_text():
    source = demo_rows(7, seed=3)
    rows = bench_data.resample(source, 50)
    firsts = [next(t for t in r["conversations"] if t["from"] == "human")["value"] for r in rows]
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == 50
    assert firsts[2] == next(t for t in source[2]["conversations"] if t["from"] == "human")["value"] + " (copy 2)"
    assert all(f.endswith(f" (copy {i})") for i, f in enumerate(firsts))
    assert all(r["chosen"] in [s["chosen"] for s in source] for r in rows)


def test_ratio_lines_from_given_figures(capsys):
    def size(rows, cold1, cold2, warm, floor, rss):
        run = lambda s: {"seconds": s, "peak_mb": rss, "rows_kept": str(rows), "note": ""}  # noqa: E731
        return {"rows": rows, "runs": {"cold 1": run(cold1), "cold 2": run(cold2), "warm 2": run(warm)},
                "floor_seconds": floor, "floor_tokens": 10}

    bench_data.print_data_tables([size(1200, 12.0, 10.0, 1.0, 4.0, 400.0), size(12000, 90.0, 60.0, 3.0, 40.0, 500.0)])
    out = capsys.readouterr().out
    assert "1,200 rows: cold(2 workers) / floor = 2.50x" in out and "warm / cold(2 workers) = 0.10x" in out
    assert "12,000 rows: cold(2 workers) / floor = 1.50x" in out and "cold(1) / cold(2) = 1.50x" in out
    assert "12,000 rows / 1,200 rows = 1.25x" in out


def test_bench_data_end_to_end(tmp_path):
    source = tmp_path / "demo.json"
    source.write_text(json.dumps(demo_rows(20, seed=1)))
    figures = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "data", "--source", str(source),
                           "--sizes", "40", "--json", str(figures)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "40 rows: cold(2 workers) / floor = " in proc.stdout and "warm / cold(2 workers) = " in proc.stdout
    assert "peak RSS ratio: needs two sizes" in proc.stdout
    (result,) = json.loads(figures.read_text())
    assert set(result["runs"]) == {"cold 1", "cold 2", "warm 2"}
    assert all(r["rows_kept"] == "40" and r["seconds"] > 0 and r["peak_mb"] > 50 for r in result["runs"].values())
    assert result["floor_tokens"] > 40 * 2 * 10  # prompt + chosen and prompt + rejected, a dozen tokens or more each
