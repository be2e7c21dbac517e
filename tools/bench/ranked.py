"""One `dpo-lean train|precompute CONFIG` process, alone or one rank of a launch, that reports its own memory and time.

    torchrun --nproc_per_node 2 tools/bench/ranked.py train CONFIG.yaml     (or: python tools/bench/ranked.py ...)

It prints one line, ``SCALEOUT {json}``, with this process's rank and, from dpo_lean/measure.py (VmHWM, VmRSS):
load_peak_gb, its peak RSS until the model is loaded (and, under FSDP, sharded), start_gb, the RSS then, peak_gb,
its peak RSS from then on (the peak is restarted there), and the time of each train step (train) or of the
scoring pass (precompute).
"""

from __future__ import annotations

import json
import os
import sys
import time


def _loaded(record: dict) -> None:
    from dpo_lean import measure

    record["load_peak_gb"] = measure.peak_memory_gb()
    record["start_gb"] = measure.current_memory_gb()
    measure.reset_peak()
    record["t0"] = time.perf_counter()


def probe_train(record: dict) -> None:
    """Train's model is loaded and sharded when training begins; a timestamp at the end of every step."""
    from transformers import TrainerCallback

    from dpo_lean import train

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _loaded(record)
            record["step_ends"] = []

        def on_step_end(self, args, state, control, **kwargs):
            record["step_ends"].append(time.perf_counter() - record["t0"])

    original = train.DPOLeanTrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Probe())

    train.DPOLeanTrainer.__init__ = init


def probe_precompute(record: dict) -> None:
    """Precompute's model is loaded and sharded when its batch scorer exists."""
    from dpo_lean import precompute

    original = precompute._scorer

    def scorer(*args, **kwargs):
        score = original(*args, **kwargs)
        _loaded(record)
        return score

    precompute._scorer = scorer


def main() -> None:
    command, config = sys.argv[1], sys.argv[2]
    record = {"rank": int(os.environ.get("RANK", "0")), "command": command}
    {"train": probe_train, "precompute": probe_precompute}[command](record)
    from dpo_lean import measure
    from dpo_lean.cli import main as cli

    sys.argv = ["dpo-lean", command, config]
    try:
        cli()
    finally:
        if "t0" in record:
            record["seconds"] = time.perf_counter() - record.pop("t0")
            record["peak_gb"] = measure.peak_memory_gb()
        print("SCALEOUT " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
