"""What the check records: the environment, each step's parsed result, results.json and summary.md (one table of
steps, one of the bench rows: memory, step time, tokens/s, model FLOP utilisation)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LIBRARIES = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "datasets", "trl", "tokenizers",
             "huggingface-hub", "safetensors", "pyarrow", "numpy", "fsspec", "dill", "multiprocess", "flash-attn")
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def print_env() -> None:
    print(json.dumps(environment()))


def environment(imports: bool = True) -> dict:
    """Versions, GPUs, CUDA. ``imports``: import every library the steps use first, so an import error shows here
    (a dry run reads versions only: it installs nothing, and torch's import alone is seconds)."""
    import importlib
    import importlib.util
    import platform
    from importlib import metadata

    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl")[:7 if imports else 0]:
        importlib.import_module(name)

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    torch = sys.modules.get("torch")
    cuda = torch is not None and torch.cuda.is_available()
    return {"python": platform.python_version(), "executable": sys.executable,
            "versions": {name: version(name) for name in LIBRARIES}, "cuda": torch.version.cuda if torch else None,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1) if cuda else None,
            "flash_attn": importlib.util.find_spec("flash_attn") is not None}


def env_line(env: dict) -> str:
    v = env["versions"]
    where = f"{', '.join(env['gpus'])} ({env['gpu_memory_gb']} GB), CUDA {env['cuda']}" if env["gpus"] else "no GPU"
    libs = ", ".join(f"{k} {v[k]}" for k in LIBRARIES if v.get(k))
    return f"{where}; Python {env['python']}; {libs}"


def read_result(name: str, log: Path, json_path: Path | None, dry_run: bool = False) -> dict:
    """The step's figures: pytest's counts, a step's RESULT line, or the bench's JSON (partial if it was cut short)."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
    if name == "cuda-tests":
        counts = {}
        for n, what in PYTEST_COUNT.findall(text.splitlines()[-1] if text.strip() else ""):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
        bad = counts.get("failed", 0) + counts.get("error", 0)
        return {"ok": bad == 0 and (counts.get("passed", 0) > 0 or dry_run), "result": counts,
                "detail": ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"}
    if json_path is not None:
        figures = json.loads(json_path.read_text()) if json_path.exists() else {}
        return {"ok": bool(figures) and not _bench_errors(figures), "result": figures, "detail": _bench_detail(figures)}
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        return {"ok": False, "detail": f"no result; last line: {tail[0][:200]}"}
    result = json.loads(lines[-1][7:])
    return {"ok": result.pop("ok"), "detail": result.pop("detail"), "result": result}


def _bench_errors(figures: dict) -> list[str]:
    return [f"{group} {c}: {r['error']}" for shape in figures.values() for group in ("train", "precompute")
            for c, r in shape.get(group, {}).items() if "error" in r]


def _bench_detail(figures: dict) -> str:
    if not figures:
        return "no figures"
    errors = _bench_errors(figures)
    done = [f"{g} {c}" for shape in figures.values() for g in ("precompute", "train") for c in shape.get(g, {})]
    return (f"{len(done)} rows: {', '.join(done)}" + (f"; failed: {'; '.join(errors)}" if errors else ""))[:400]


def bench_rows(results: dict) -> list[tuple]:
    """One row per bench contender: (step, shape, row, attention, peak allocated, peak reserved, step s, tokens/s,
    tokens/s vs the bare forward, model FLOPs/s over the measured matmul rate)."""
    from bench.shapes import TRAIN_FLOPS

    rows = []
    for step, record in results["steps"].items():
        if not step.startswith("bench"):
            continue
        for shape, r in (record.get("result") or {}).items():
            n, rate = r["n_matmul_params"], r["matmul_flops"]
            bare = r["precompute"].get("bare-forward", {})
            bare_tps = bare["tokens"] / bare["seconds"] if "tokens" in bare else None
            for group in ("train", "precompute"):
                for c, f in r[group].items():
                    rows.append(_bench_row(step, shape, r.get("attention"), group, c, f, n, rate, bare_tps,
                                           TRAIN_FLOPS.get(c, 4)))
    return rows


def _bench_row(step, shape, attn, group, contender, f, n, rate, bare_tps, train_flops) -> tuple:
    label = f"{group} {contender}"
    if "error" in f:
        return (step, shape, label, attn, "failed: " + f["error"][:80], "", "", "", "", "")
    reserved = f.get("reserved_gb")
    if group == "train":
        tps, step_s, flops, vs = f["tokens_per_second"], f"{f['step_seconds']:.3f}", train_flops * n, ""
    else:
        tps, step_s, flops = f["tokens"] / f["seconds"], "", 2 * n
        vs = f"{tps / bare_tps:.2f}x" if bare_tps else ""
    return (step, shape, label, attn, f"{f['peak_gb']:.2f}", f"{reserved:.2f}" if reserved is not None else "-",
            step_s, f"{tps:,.0f}", vs, f"{flops * tps / rate:.1%}")


def summary(results: dict) -> str:
    lines = ["# gpu_check summary" + (" (dry run: CPU, tiny sizes; no figure here is a GPU's)"
                                      if results.get("dry_run") else ""), ""]
    if "env" in results:
        lines += [env_line(results["env"]), ""]
    lines += [f"setup {results.get('setup_seconds', '?')} s; total {results.get('total_seconds', 'running')} s of a "
              f"{results['budget_s']} s budget", "",
              "| step | status | s | cap s | expected s | detail |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for name, r in results["steps"].items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {r['cap_s']} | {r['estimate_s']} | "
                     f"{r.get('detail', '')} |")
    rows = bench_rows(results)
    if rows:
        lines += ["", "Bench: NF4 base, bf16 compute, LoRA r=16 on all linear layers, 1 pair a step; peak memory is "
                  "CUDA's (RSS on CPU); utilisation = model FLOPs/s over the matmul rate measured in the same step", "",
                  "| step | shape | row | attention | peak allocated GB | peak reserved GB | step s | tokens/s | "
                  "vs bare forward | of matmul rate |", "|" + " --- |" * 10]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict) -> None:
    """results.json and summary.md, each replaced whole (a run cut short leaves the last complete pair)."""
    for name, text in (("results.json", json.dumps(results, indent=1)), ("summary.md", summary(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
