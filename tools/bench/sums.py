"""`tools/bench sums`: how far each completion's summed log-prob is from a float64 forward summed in float64.

The model is the issue-27 tiny one (Qwen2, hidden 64, 2 layers, vocab --sums-vocab, random weights, float32, CPU);
the rows are the --sums-rows rows of dpo_en_demo.json (--source) with the longest completions whose prompt is
under 2,000 characters (2 completions a row), tokenised with the tiny tokenizer, nothing truncated. The exact
value of a completion is sum_t log_softmax(z_t)[y_t] from one full-logits forward of a float64 copy of the same
weights, summed in float64. Measured against it:

    per-token, float64 sum   dpo-lean's own per-token values (logprobs.token_logps), summed in float64
    per-token, float32 sum   the same values, torch.sum in float32
    cache, two sequences     what `dpo-lean precompute` stores (ref_*_logps), prefix_sharing false
    cache, shared layout     the same with prefix_sharing true
    cache, tail sums         ref_*_tail_logps (LD-DPO) against the float64 sum past the pair's shorter completion
    TRL compute_ref_log_probs  TRL's precompute pass on the same rows (same token ids), with --sums-trl
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.data import source_rows
from bench.suite import build_model, dpo_config
from bench.tables import print_table


def add_sums_arguments(parser) -> None:
    group = parser.add_argument_group("sums (tools/bench sums)")
    group.add_argument("--sums-rows", type=int, default=16, help="rows (two completions each)")
    group.add_argument("--sums-vocab", type=int, default=4096, help="vocabulary of the tiny model")
    group.add_argument("--sums-trl", action="store_true", help="also TRL's precompute pass")


def _rows(source: Path, n: int) -> list[dict]:
    rows = [r for r in source_rows(source) if sum(len(t["value"]) for t in r["conversations"]) < 2000]
    rows.sort(key=lambda r: -(len(r["chosen"]["value"]) + len(r["rejected"]["value"])))
    return rows[:n]


def _exact(model, prompt: list[int], completion: list[int]):
    """float64 log p of each completion token, from one full-logits forward of prompt + completion."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return logp.gather(1, ids[0, 1:, None])[len(prompt) - 1:, 0]


def _per_token(config, rows):
    """dpo-lean's per-token values, per completion (chosen..., rejected...), as precompute's model computes them."""
    import torch

    from dpo_lean import modeling
    from dpo_lean.layout import collate_pairs
    from dpo_lean.logprobs import token_logps

    model = modeling.prepare_reference(config)
    out = []
    for r in rows:
        batch = collate_pairs([r.prompt_ids], [r.chosen_ids], [r.rejected_ids], pad_id=0)
        with modeling.inference(model):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            head = model.get_output_embeddings().head
            values = token_logps(hidden.reshape(-1, hidden.shape[-1])[batch["score_index"]], head.weight,
                                 batch["score_targets"], head.bias)
        out.append(torch.split(values, [len(r.chosen_ids), len(r.rejected_ids)]))
    return [c for c, _ in out] + [r for _, r in out]


def _cache(config, sharing: bool) -> dict[int, dict]:
    from dpo_lean import cache
    from dpo_lean.config import from_dict
    from dpo_lean.precompute import run_precompute

    config = from_dict({**config.to_dict(), "prefix_sharing": sharing,
                        "ref_cache_dir": f"{config.resolved_ref_cache_dir}-{'shared' if sharing else 'two'}"})
    run_precompute(config)
    return {r["row_index"]: r for r in cache.scan(config.resolved_ref_cache_dir).table.to_pylist()}


def _errors(values: list[float], exact: list[float]) -> tuple[str, str, str]:
    err = [abs(v - e) for v, e in zip(values, exact)]
    rel = max(d / max(abs(e), 1e-300) for d, e in zip(err, exact))
    return f"{sum(err) / len(err):.1e}", f"{max(err):.1e}", f"{rel:.1e}"


def _trl_sums(raw: dict, rows) -> list[float]:
    from bench.contenders import _trl_trainer

    data = _trl_trainer(raw, precompute=True).train_dataset
    for i, r in enumerate(rows):
        theirs = (data[i]["prompt_ids"], data[i]["chosen_ids"], data[i]["rejected_ids"])
        assert theirs == (r.prompt_ids, r.chosen_ids, r.rejected_ids), f"row {i}: TRL has other token ids"
    return list(data["ref_chosen_logps"]) + list(data["ref_rejected_logps"])


def run_sums(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_lean import modeling
    from dpo_lean.config import from_dict
    from dpo_lean.data.pipeline import prepare_data

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model", args.sums_vocab, hidden=64, layers=2)
        (tmp / "rows.json").write_text(json.dumps(_rows(Path(args.source), args.sums_rows)))
        settings = SimpleNamespace(cutoff=8192, truncation="keep_start", batch=4, warmup=0, steps=1)
        raw = {**dpo_config(settings, model_dir, str(tmp / "rows.json"), tmp / "out"), "quantization_bit": None,
               "bf16": False, "cache_part_rows": 4 * args.sums_rows}
        config = from_dict(raw)
        rows = sorted(prepare_data(config, modeling.load_tokenizer(config)).rows, key=lambda r: r.row_index)
        assert len(rows) == args.sums_rows and not any(r.truncated for r in rows)
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        exact_tokens = ([_exact(plain, r.prompt_ids, r.chosen_ids) for r in rows]
                        + [_exact(plain, r.prompt_ids, r.rejected_ids) for r in rows])
        exact = [float(t.sum()) for t in exact_tokens]
        n = len(rows)
        shorter = [min(len(r.chosen_ids), len(r.rejected_ids)) for r in rows] * 2
        exact_tail = [float(t[k:].sum()) for t, k in zip(exact_tokens, shorter)]
        tokens = _per_token(config, rows)
        results = {"per-token values, float64 sum": [float(t.double().sum()) for t in tokens],
                   "per-token values, float32 torch.sum": [float(t.sum()) for t in tokens]}
        for sharing in (False, True):
            cached = _cache(config, sharing)
            values = [cached[r.row_index]["ref_chosen_logps"] for r in rows] + \
                     [cached[r.row_index]["ref_rejected_logps"] for r in rows]
            results[f"cache, {'shared layout' if sharing else 'two sequences'}"] = values
        tails = [cached[r.row_index]["ref_chosen_tail_logps"] for r in rows] + \
                [cached[r.row_index]["ref_rejected_tail_logps"] for r in rows]
        if args.sums_trl:
            results["TRL 1.16 compute_ref_log_probs"] = _trl_sums(raw, rows)
    lengths = [len(r.chosen_ids) for r in rows] + [len(r.rejected_ids) for r in rows]
    print(f"\n{2 * n} completions of {min(lengths)} to {max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}), "
          f"sums {max(exact):.0f} to {min(exact):.0f} nats; tiny Qwen2 hidden 64, 2 layers, vocab {args.sums_vocab}, "
          f"float32 on CPU; {time.perf_counter() - t0:.0f} s")
    table = [(name, *_errors(v, exact)) for name, v in results.items()]
    long_tails = [i for i, e in enumerate(exact_tail) if e != 0.0]
    table.append(("cache, tail sums (shared layout)",
                  *_errors([tails[i] for i in long_tails], [exact_tail[i] for i in long_tails])))
    print_table("summed log-prob of each completion against a float64 forward summed in float64", table,
                ("how it is summed", "mean error, nats", "max error, nats", "max error / |sum|"))
    return {"rows": table, "lengths": lengths}
