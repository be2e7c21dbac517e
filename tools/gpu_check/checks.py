"""The steps that run inside one process: the demo in bf16, and precompute's out-of-memory handling under a real
memory cap. Each prints ``RESULT {json}`` last (``ok``, ``detail`` and its figures), which the runner reads."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from argparse import Namespace
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

OOM_LINE = re.compile(r"precompute: out of memory at (\d+) pairs a batch; continuing at (\d+)")
GROW_LINE = re.compile(r"precompute: (\d+) clean batches at (\d+) pairs a batch; trying (\d+) again")
DRY_DEMO = ["max_samples=32", "val_size=8", "max_steps=1", "eval_steps=1", "logging_steps=1", "save_strategy=no"]


def _result(ok: bool, detail: str, **figures) -> None:
    print("RESULT " + json.dumps({"ok": ok, "detail": detail, **figures}), flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- demo


def demo(work: Path, dry_run: bool, _shape: str = "") -> None:
    """`dpo-lean precompute`, `train` and `evaluate` (the CLI, in this process) on the demo's config with bf16=true
    on the 4-bit tiny model, for one epoch (225 steps; on CPU one epoch took the accuracy from 0.48 to 0.95, three
    are the demo's default): held-out reward accuracy about 0.5 before training, at least 0.9 after."""
    from dpo_lean.cli import main as cli
    from dpo_lean.demo import write_demo_config

    out = work / "demo"
    shutil.rmtree(out, ignore_errors=True)
    config = str(write_demo_config(out, epochs=1.0))
    overrides = ["bf16=true", *(DRY_DEMO if dry_run else [])]
    seconds = {}
    for command in ("precompute", "train", "evaluate"):
        t0 = time.perf_counter()
        print(f"\n== dpo-lean {command} {config} {' '.join(overrides)}", flush=True)
        cli([command, config, *overrides], standalone_mode=False)
        seconds[command] = round(time.perf_counter() - t0, 1)
    history = json.loads((out / "run" / "dpo_metrics" / "log_history.json").read_text())
    accuracies = [h["eval_rewards/accuracies"] for h in history if "eval_rewards/accuracies" in h]
    evaluated = json.loads((out / "run" / "dpo_metrics" / "eval_results.json").read_text())
    before, after = accuracies[0], accuracies[-1]
    ok = dry_run or (abs(before - 0.5) < 0.1 and after >= 0.9)
    _result(ok, f"held-out reward accuracy {before:.2f} -> {after:.2f} (evaluate: "
                f"{evaluated['eval_rewards/accuracies']:.2f}); seconds {seconds}",
            before=before, after=after, evaluate=evaluated["eval_rewards/accuracies"], seconds=seconds)


# --------------------------------------------------------------------------- out of memory


def oom_rows(dry_run: bool, grow_after: int) -> list[tuple[int, int]]:
    """(prompt, completion) lengths: long rows (they run first and run out of memory at 8 pairs a batch under the
    cap: 3 batches of them, 1 in a dry run), then enough short ones for ``grow_after`` clean batches at 4 pairs and
    more batches at 8 after it (8; 2 in a dry run)."""
    if dry_run:
        return [(32, 24)] * 8 + [(16, 8)] * (4 * grow_after + 16)
    return [(1024, 1024)] * 24 + [(256, 256)] * (4 * grow_after + 64)


def parse_oom_lines(text: str) -> dict:
    """Precompute's out-of-memory lines: halvings (size, half), grow-backs (clean batches, size, bigger), and whether
    the last grow-back held (no out-of-memory at that size after it)."""
    events = []
    for line in text.splitlines():
        if m := OOM_LINE.search(line):
            events.append(("oom", int(m[1]), int(m[2])))
        elif m := GROW_LINE.search(line):
            events.append(("grow", int(m[1]), int(m[2]), int(m[3])))
    grows = [i for i, e in enumerate(events) if e[0] == "grow"]
    held = bool(grows) and not any(e[0] == "oom" and e[1] == events[grows[-1]][3] for e in events[grows[-1]:])
    return {"halvings": [list(e[1:]) for e in events if e[0] == "oom"], "grow_backs": [list(events[i][1:]) for i in grows],
            "last_grow_back_held": held}


class _Reference:
    """Wraps modeling.prepare_reference: notes the memory the loaded reference takes, then (``cap``) limits this
    process's CUDA memory to it plus a share of what the uncapped pass needed; in a dry run, a forward larger than
    that share of the uncapped pass's largest batch raises torch.cuda.OutOfMemoryError instead."""

    def __init__(self, modeling, dry_run: bool):
        self.load, self.dry_run = modeling.prepare_reference, dry_run
        self.base = self.peak_tokens = 0
        self.limit: float | None = None

    def __call__(self, config):
        import torch

        model = self.load(config)
        if self.dry_run:
            model.register_forward_pre_hook(self._fake_cap, with_kwargs=True)
        else:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_reserved()
            torch.cuda.reset_peak_memory_stats()
            if self.limit is not None:
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(self.limit / total)
        return model

    def _fake_cap(self, module, args, kwargs):
        import torch

        tokens = kwargs["input_ids"].numel()
        self.peak_tokens = max(self.peak_tokens, tokens)
        if self.limit is not None and tokens > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (dry run: {tokens} tokens over {self.limit:.0f})")

    def set_cap(self, share: float) -> float:
        """The limit for the next load: base + share of what the uncapped pass needed over it (dry run: tokens)."""
        import gc

        import torch

        gc.collect()  # the uncapped pass's model, before the capped pass loads its own
        if self.dry_run:
            self.limit = share * self.peak_tokens
        else:
            self.limit = self.base + share * (torch.cuda.max_memory_reserved() - self.base)
            torch.cuda.empty_cache()
        return self.limit


def oom(work: Path, dry_run: bool, shape: str) -> None:
    """Precompute uncapped, then under a cap of the reference plus 55% of the memory the uncapped pass needed: the
    long first batches run out of memory and halve, the short later ones grow back; both caches must agree."""
    from bench.shapes import build_shape_model, write_rows_of_lengths
    from bench.suite import dpo_config

    import dpo_lean.precompute as pre
    from dpo_lean import cache, modeling
    from dpo_lean.config import from_dict

    model = build_shape_model(work / "models" / f"model-{shape}", shape)
    run = work / "oom"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    lengths = oom_rows(dry_run, getattr(pre, "GROW_AFTER", 16))
    raw = dpo_config(Namespace(cutoff=sum(lengths[0]), truncation="keep_start", batch=8, warmup=0, steps=1),
                     model, str(run / "rows.json"), run / "out")
    write_rows_of_lengths(run / "rows.json", raw, lengths)
    reference = _Reference(modeling, dry_run)
    modeling.prepare_reference = reference
    uncapped = pre.run_precompute(from_dict({**raw, "ref_cache_dir": str(run / "uncapped")}))
    limit = reference.set_cap(0.55)
    stderr = StringIO()
    try:
        with redirect_stderr(_Tee(stderr, sys.stderr)):
            capped = pre.run_precompute(from_dict({**raw, "ref_cache_dir": str(run / "capped")}))
    finally:
        if not dry_run:
            import torch

            torch.cuda.set_per_process_memory_fraction(1.0)
    events = parse_oom_lines(stderr.getvalue())
    a, b = (_values(cache.scan(run / name).table) for name in ("uncapped", "capped"))
    diff = max(abs(a[k] - b[k]) for k in a) if a.keys() == b.keys() else float("inf")
    scale = max(abs(v) for v in a.values())
    ok = bool(events["halvings"]) and bool(events["grow_backs"]) and diff <= (1e-4 if dry_run else 1e-2) * scale
    unit = "tokens a forward" if dry_run else "GB"
    _result(ok, f"cap {limit / (1 if dry_run else 1e9):.2f} {unit}: {len(events['halvings'])} halving(s) "
                f"{events['halvings'][:3]}, {len(events['grow_backs'])} grow-back(s) {events['grow_backs'][:3]} "
                f"(last held: {events['last_grow_back_held']}); {len(b)} of {len(a)} rows, max |diff| {diff:.2g} "
                f"nats (values up to {scale:.0f}); {capped['tokens_per_second']:,.0f} tokens/s capped vs "
                f"{uncapped['tokens_per_second']:,.0f} uncapped",
            cap=limit, **events, max_abs_diff=diff, rows=len(a), capped_tokens_per_second=capped["tokens_per_second"],
            uncapped_tokens_per_second=uncapped["tokens_per_second"])


def _values(table) -> dict:
    ids = table.column("id").to_pylist()
    chosen, rejected = table.column("ref_chosen_logps").to_pylist(), table.column("ref_rejected_logps").to_pylist()
    return {**{(i, "c"): v for i, v in zip(ids, chosen)}, **{(i, "r"): v for i, v in zip(ids, rejected)}}


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:  # a log, not a terminal: progress is printed line by line
        return False
