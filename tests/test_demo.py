"""`dpo-lean demo`, the README's main command: the whole pipeline, and the policy learns the rule."""

from __future__ import annotations

import json
import re
import subprocess
import sys


def test_demo_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dpo_lean.cli", "demo", "--output", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"held-out reward accuracy: ([\d.]+) before training -> ([\d.]+) after", proc.stdout)
    assert match, proc.stdout[-2000:]
    before, after = map(float, match.groups())
    assert abs(before - 0.5) < 0.05 and after >= 0.9
    assert "rows loaded: 2000" in proc.stdout and "cache " in proc.stdout and "complete" in proc.stdout

    run = tmp_path / "demo" / "run"
    for name in ("training_metrics.csv", "log_history.json", "summary.json", "training_curves.png"):
        assert (run / "dpo_metrics" / name).is_file(), name
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    summary = json.loads((run / "dpo_metrics" / "summary.json").read_text())
    assert summary["final_eval"]["rewards/accuracies"] == after or abs(summary["final_eval"]["rewards/accuracies"] - after) < 0.005
