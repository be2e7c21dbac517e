"""Where a process sits in a launch, read once per call from RANK / LOCAL_RANK / WORLD_SIZE (dpo_lean/launch.py)."""

from __future__ import annotations

import pytest

from dpo_lean import launch
from dpo_lean.errors import DpoLeanError


def test_a_plain_run_is_rank_0_of_1(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert (launch.rank(), launch.local_rank(), launch.world_size(), launch.is_main_process()) == (0, 0, 1, True)
    launch.refuse_launcher("evaluate")  # nothing to refuse


def test_under_a_launcher_only_rank_0_prints_and_one_process_commands_refuse(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    launch.say("from rank 2")
    monkeypatch.setenv("RANK", "0")
    launch.say("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"
    with pytest.raises(DpoLeanError, match=r"^sweep runs in one process; run `dpo-lean sweep CONFIG.yaml ...` without"):
        launch.refuse_launcher("sweep", "CONFIG.yaml ...")


def test_a_variable_that_is_not_a_number_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("RANK", "zero")
    with pytest.raises(DpoLeanError, match=r"^environment variable RANK='zero' is not a whole number; .*unset it"):
        launch.rank()
