"""tools/bench data: it runs end to end and prints the issue-15 ratios, so the benchmark cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dpo_lean.tiny import demo_rows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench import data as bench_data  # noqa: E402


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
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench"), "data", "--source", str(source),
                           "--sizes", "40", "--json", str(figures)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "40 rows: cold(2 workers) / floor = " in proc.stdout and "warm / cold(2 workers) = " in proc.stdout
    assert "peak RSS ratio: needs two sizes" in proc.stdout
    (result,) = json.loads(figures.read_text())
    assert set(result["runs"]) == {"cold 1", "cold 2", "warm 2"}
    assert all(r["rows_kept"] == "40" and r["seconds"] > 0 and r["peak_mb"] > 50 for r in result["runs"].values())
    assert result["floor_tokens"] > 40 * 2 * 10  # prompt + chosen and prompt + rejected, a dozen tokens or more each


def test_real_shape_parameter_counts_match_the_model_cards():
    from bench import shapes as bench_shapes

    # Qwen2.5 model cards: 0.49B parameters (0.36B non-embedding), 1.54B (1.31B non-embedding), embeddings tied;
    # 7.61B (6.53B non-embedding), the input embedding and the head apart (the head multiplies, the embedding not)
    for name, total, non_embedding in (("Qwen2.5-0.5B", 0.49e9, 0.36e9), ("Qwen2.5-1.5B", 1.54e9, 1.31e9),
                                       ("Qwen2.5-7B", 7.61e9, 6.53e9)):
        cfg = bench_shapes.shape_config(name)
        n, embedding = bench_shapes.matmul_params(cfg), cfg["vocab_size"] * cfg["hidden_size"]
        untied_embedding = 0 if cfg["tie_word_embeddings"] else embedding
        # the cards give two decimals, cut (7,615,616,512 parameters are "7.61B")
        assert abs(n + untied_embedding - total) < 0.01e9 and abs(n - embedding - non_embedding) < 0.01e9


def test_real_shape_tokenizer_gives_exact_lengths_and_survives_qwen2_reload(tmp_path):
    from bench import shapes as bench_shapes
    from transformers import AutoTokenizer, Qwen2Config

    tokenizer = bench_shapes.word_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    Qwen2Config(**bench_shapes.QWEN25_COMMON, **bench_shapes.QWEN25["Qwen2.5-0.5B"]).save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # transformers picks its Qwen2 tokenizer for model_type qwen2
    words = bench_shapes.word_vocab()[2]
    text = "xy " + " ".join(words[i] for i in (0, 1, 77_000, len(words) - 1))
    ids = reloaded(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"] and len(ids) == 5
    assert max(ids) == bench_shapes.SPECIAL["<|endoftext|>"] - 1 and len(reloaded) == 151646


def test_bench_scale_end_to_end(tmp_path):
    """tools/bench scale reads the commands' own lines: the rows tokenised once (by precompute), reused by train."""
    source = tmp_path / "demo.json"
    source.write_text(json.dumps(demo_rows(20, seed=2)))
    figures = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench"), "scale", "--source", str(source),
                           "--scale-rows", "40", "--scale-steps", "2", "--json", str(figures)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(figures.read_text())
    assert (result["precompute"]["tokenised"], result["precompute"]["reused"]) == (1, 0)
    assert (result["train"]["tokenised"], result["train"]["reused"]) == (0, 1)
    assert 0 <= result["train"]["data_ready_seconds"] < result["train"]["seconds"]
    assert "the rows were tokenised 1 time(s) in total (target 1)" in proc.stdout
