"""Bad input, fuzzed: every input is a counted skip or a one-line DpoLeanError, never a traceback or a lost row.

Property-based tests (hypothesis) feed random JSON structures, wrong types and unicode edge cases (empty
strings, lone surrogates, NUL bytes, RTL text, combining marks, emoji, 200k-character lines) to the loader
as .json/.jsonl files and as in-memory rows, through tokenisation with the tiny fixture tokenizer, and
random keys and values to the config (dict, YAML text, overrides) and to ``dpo-lean data-check``.
The ``test_regression_*`` tests pin each bug the fuzzing found.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_lean.config import load_config, parse_override
from dpo_lean.errors import DpoLeanError

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "tests" / "fixtures" / "tiny-model"


def assert_one_line(error: DpoLeanError, *names: str) -> str:
    """The message is one printable line and names each of ``names`` (a file, key or row)."""
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, message
    message.encode("utf-8")  # printable: no lone surrogates
    assert "Traceback" not in message
    for name in names:
        assert name in message, (name, message)
    return message


def config_error(tmp_path: Path, text: str | bytes, *overrides: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    with pytest.raises(DpoLeanError) as err:
        load_config(path, overrides)
    return assert_one_line(err.value)


# --- regressions: config ------------------------------------------------------------------------

def test_regression_yaml_integer_over_4300_digits_is_one_line_error(tmp_path):
    message = config_error(tmp_path, "cutoff_len: " + "9" * 5000 + "\n")
    assert "config.yaml" in message and "4300 digits" in message


def test_regression_yaml_nested_too_deeply_is_one_line_error(tmp_path):
    message = config_error(tmp_path, "dataset: " + "[" * 3000 + "]" * 3000 + "\n")
    assert "config.yaml" in message and "nested too deeply" in message


@pytest.mark.parametrize("key", ["1", "~", "true", "2024-01-01", "1.5"])
def test_regression_yaml_non_string_key_is_an_unknown_key(tmp_path, key):
    assert "unknown config key" in config_error(tmp_path, f"{key}: 2\n")


def test_regression_config_file_not_utf8_is_one_line_error(tmp_path):
    assert "not UTF-8" in config_error(tmp_path, b"dataset: \xff\xfe\n")


def test_regression_integer_too_large_for_a_float_key(tmp_path):
    message = config_error(tmp_path, "learning_rate: " + "9" * 400 + "\n")
    assert "'learning_rate'" in message and "too large" in message and len(message) < 300


@pytest.mark.parametrize("text", ["learning_rate: .inf\n", "learning_rate: '1e999'\n", "pref_beta: '" + "9" * 5000 + "'\n",
                                  "max_grad_norm: .inf\n"])
def test_regression_infinite_number_is_refused(tmp_path, text):
    assert "finite" in config_error(tmp_path, text)


def test_regression_nul_byte_in_a_config_string_is_refused(tmp_path):
    assert "'output_dir'" in config_error(tmp_path, 'output_dir: "out\\0put"\n')
    assert "NUL byte" in config_error(tmp_path, "", "dataset_dir=da\x00ta")


def test_regression_long_or_aliased_values_are_shown_short(tmp_path):
    assert len(config_error(tmp_path, "template: " + "x" * 200_000 + "\n")) < 300
    # nine levels of nine YAML aliases: 9**9 strings if expanded; the message must stay short (and fast)
    levels = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    message = config_error(tmp_path, "run_name: [" + ", ".join(levels) + "]\n")
    assert "'run_name'" in message and len(message) < 300


def test_regression_yaml_error_problem_is_one_line(tmp_path):
    config_error(tmp_path, "dataset: [a,\n  b\nlora_rank: {\n")


def test_regression_override_with_huge_integer_or_deep_nesting_is_text():
    assert parse_override("seed=" + "9" * 5000) == ("seed", "9" * 5000)
    assert parse_override("run_name=" + "[" * 3000) == ("run_name", "[" * 3000)
    with pytest.raises(DpoLeanError, match="'seed'"):
        load_config(None, ["seed=" + "9" * 5000])


def test_regression_error_with_lone_surrogate_is_printable():
    message = str(DpoLeanError("dataset '\ud800x.json' not found"))
    assert message == "dataset '\\ud800x.json' not found"
    message.encode("utf-8")
