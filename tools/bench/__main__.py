"""`python tools/bench COMMAND ...`: run the benchmark package (tools/ holds it; it is not installed)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/, so `bench` imports as a package

from bench.cli import main  # noqa: E402

main()
