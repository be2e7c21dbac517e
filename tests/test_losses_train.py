"""Every loss trains the demo on CPU, and at step 0 (policy = reference) logs what its formula gives there.

The first logged loss (step 1, logging_steps 1) is the loss of the first batch before any update, and the batch is
all 64 demo rows, so where the step-0 value depends on the data (sft, orpo, simpo, pref_ftx) it is computed here
from the committed reference cache's columns read with pyarrow (the reference is the policy's starting point,
loaded alike). Elsewhere every log-ratio is 0 and the value is a constant of the formula.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import FIXTURES

from dpo_lean import cache, cache_report, modeling, scoring, train
from dpo_lean.errors import DpoLeanError
from dpo_lean.fingerprint import fingerprint_digest

LN2 = math.log(2)
RUN = dict(per_device_train_batch_size=64, max_steps=2, logging_steps=1, save_strategy="no", learning_rate=5e-3,
           plot_loss=False)


@pytest.fixture(scope="module")
def ref():
    """The fixture cache's columns, float64: the policy's own log-probs at step 0."""
    table = pads.dataset(FIXTURES / "demo" / "ref_cache", format="parquet").to_table().to_pydict()
    return {k: np.asarray(v, dtype=np.float64) for k, v in table.items() if k not in ("id", "ids_sha256")}


def sft0(r):
    return -r["ref_chosen_logps"].sum() / r["chosen_tokens"].sum()


def averaged(r):
    return r["ref_chosen_logps"] / r["chosen_tokens"], r["ref_rejected_logps"] / r["rejected_tokens"]


def orpo0(r, beta=0.1):
    a, b = averaged(r)
    log_odds = (a - b) - (np.log1p(-np.exp(a)) - np.log1p(-np.exp(b)))
    return float(np.mean(-a + beta * np.log1p(np.exp(-log_odds))))


def simpo0(r, beta=0.1, gamma=0.5):
    a, b = averaged(r)
    return float(np.mean(np.log1p(np.exp(-(beta * (a - b) - gamma)))))


# (config keys, step-0 value: a constant or a function of the cache columns)
STEP0 = [
    ({"pref_loss": "sigmoid"}, LN2),
    ({"pref_loss": "hinge"}, 1.0),                                        # max(0, 1 - 0)
    ({"pref_loss": "ipo"}, 25.0),                                         # (0 - 1/(2 beta))^2, beta 0.1
    ({"pref_loss": "exo_pair", "dpo_label_smoothing": 1e-3}, -LN2 - 0.5 * math.log(1e-3 * (1 - 1e-3))),
    ({"pref_loss": "nca_pair"}, 2 * LN2),
    ({"pref_loss": "robust", "dpo_label_smoothing": 0.1}, LN2),           # ((0.9 - 0.1) ln 2) / 0.8
    ({"pref_loss": "bco_pair"}, 2 * LN2),
    ({"pref_loss": "sppo_hard", "pref_beta": 0.5}, 2.0),                  # 2 (1/(2 beta))^2
    ({"pref_loss": "aot"}, LN2),
    ({"pref_loss": "aot_unpaired", "dpo_label_smoothing": 0.2}, LN2),
    ({"pref_loss": "apo_zero"}, 1.0),                                     # (1 - 1/2) + 1/2
    ({"pref_loss": "apo_down"}, 1.0),                                     # 1/2 + (1 - 1/2)
    ({"pref_loss": "discopop"}, 0.5 * LN2 + 0.5),                         # ln 2 (1 - 1/2) + e^0 / 2
    ({"pref_loss": "sft"}, sft0),
    ({"pref_loss": "sigmoid_norm"}, LN2),
    ({"pref_loss": "kto_pair"}, 0.5),                                     # 1 - sigma(0)
    ({"pref_loss": "orpo"}, orpo0),
    ({"pref_loss": "simpo"}, simpo0),
    ({"pref_loss": "sigmoid,bco_pair,sft", "pref_loss_weights": "0.8,0.2,1.0"}, lambda r: 0.8 * LN2 + 0.4 * LN2 + sft0(r)),
    ({"pref_loss": "ipo", "pref_beta": 0.5, "pref_f_divergence": "alpha_divergence"}, 1.0),   # f'(1) = 0 too
    ({"pref_loss": "sigmoid", "pref_ftx": 0.5}, lambda r: LN2 + 0.5 * np.mean(-r["ref_chosen_logps"] / r["chosen_tokens"])),
    ({"pref_loss": "sigmoid", "pref_bco_weight": 0.5}, (LN2 + 0.5 * 2 * LN2) / 1.5),
]


def _id(keys):
    return " ".join(f"{k}={v}" for k, v in keys.items())


def history(config) -> list[dict]:
    return json.loads((config.metrics_dir / "log_history.json").read_text())


def train_logs(config) -> list[dict]:
    return [h for h in history(config) if "loss" in h]


@pytest.mark.parametrize("keys, expected", STEP0, ids=[_id(k) for k, _ in STEP0])
def test_each_loss_logs_its_formula_at_step_0_and_trains(keys, expected, ref, tiny_config, tmp_path, capsys):
    config = tiny_config(**RUN, **keys)
    if not config.needs_reference:  # orpo, simpo: no cache at all
        config = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "absent"), **RUN, **keys)
    train.run_train(config)
    value = expected(ref) if callable(expected) else expected
    logs = train_logs(config)
    assert logs[0]["step"] == 1 and logs[0]["loss"] == pytest.approx(value, rel=1e-3, abs=1e-4)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    if not config.needs_reference:
        assert "is reference-free: no reference cache is read" in capsys.readouterr().out
        assert not (tmp_path / "absent").exists()


def test_wpo_trains_and_weights_the_step_0_loss(tiny_config):
    """With WPO the step-0 loss is ln 2 times the mean pair weight: not ln 2 (the weights are the policy's own
    probabilities, checked against full logits in test_logprobs.py), positive, finite."""
    config = tiny_config(**RUN, pref_use_weighting=True)
    train.run_train(config)
    logs = train_logs(config)
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in logs)
    assert abs(logs[0]["loss"] - LN2) > 1e-3 and logs[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)


# ---------------------------------------------------------------- reference-free losses need no cache


def test_reference_free_loss_needs_no_precompute(tmp_path):
    from test_cli import invoke, write_config

    path = write_config(tmp_path, pref_loss="orpo")
    result = invoke("precompute", path)
    assert result.exit_code == 0, result.output
    assert "reference-free: no reference cache is needed, nothing to precompute" in result.stdout
    assert not (tmp_path / "ref_cache").exists()


def test_reference_free_training_never_loads_a_reference(tiny_config, tmp_path, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a reference-free run loaded a reference model")
    monkeypatch.setattr(modeling, "prepare_reference", forbidden)
    config = tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "none"), pref_loss="simpo,sft", max_steps=1,
                         save_strategy="no", val_size=8, plot_loss=False)
    result = train.run_train(config)
    summary = json.loads((config.metrics_dir / "summary.json").read_text())
    assert summary["cache_fingerprint"] is None and math.isfinite(result["eval"]["eval_loss"])


def test_sft_alone_reads_the_cache_as_trl(tiny_config, tmp_path):
    """TRL's sft loss type runs in a DPO trainer and logs rewards against the reference: it needs the cache."""
    with pytest.raises(DpoLeanError, match="no reference cache"):
        scoring.prepare_run(tiny_config(copy_cache=False, ref_cache_dir=str(tmp_path / "none"), pref_loss="sft"))


# ---------------------------------------------------------------- LD-DPO: the cache's tail columns


LD_ROWS = [{"prompt": f"Question {i}: name a colour.", "chosen": "Blue." * (1 + i % 3),
            "rejected": "It is a colour that " * (1 + i % 4) + "red."} for i in range(12)]


@pytest.fixture
def ld_config(tiny_config, tmp_path):
    from dpo_lean.precompute import run_precompute

    data = tmp_path / "ld.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in LD_ROWS), encoding="utf-8")
    config = tiny_config(copy_cache=False, dataset=str(data), ref_cache_dir=str(tmp_path / "ld_cache"),
                         per_device_train_batch_size=12, max_steps=2, logging_steps=1, save_strategy="no",
                         plot_loss=False, ld_alpha=0.5)
    run_precompute(config)
    return config


def test_ld_alpha_trains_on_the_tail_columns(ld_config):
    table = pads.dataset(ld_config.resolved_ref_cache_dir, format="parquet").to_table().to_pydict()
    c = {k: np.asarray(v, dtype=np.float64) for k, v in table.items() if k not in ("id", "ids_sha256")}
    longer = c["chosen_tokens"] > c["rejected_tokens"]
    assert longer.any() and (~longer & (c["chosen_tokens"] != c["rejected_tokens"])).any()
    assert (c["ref_chosen_tail_logps"][~longer] == 0).all() and (c["ref_chosen_tail_logps"][longer] < 0).all()
    assert (c["ref_rejected_tail_logps"][longer] == 0).all()
    train.run_train(ld_config)
    first = train_logs(ld_config)[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    # the policy's LD log-probs (its own tails) equal the reference's at step 0: total - (1 - alpha) tail
    for side in ("chosen", "rejected"):
        ld = np.mean(c[f"ref_{side}_logps"] - 0.5 * c[f"ref_{side}_tail_logps"])
        assert first[f"logps/{side}"] == pytest.approx(ld, abs=1e-3)
    assert np.mean(c["ref_rejected_tail_logps"]) < -20  # the tails matter here


def _as_old_format(cache_dir, version: int, drop: list[str]):
    """Rewrite a cache as an older dpo-lean wrote it: without the columns that came later, its log-probs in float32
    (before format 4), that format_version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = json.loads((cache_dir / cache.MANIFEST).read_text())
    manifest["fingerprint"]["format_version"] = manifest["format_version"] = version
    # the tokenizer was identified by its serialisation then (fingerprint.serialised_tokenizer_sha256)
    manifest["fingerprint"]["tokenizer_sha256"] = manifest["fingerprint"].pop("tokenizer_serialised_sha256")
    manifest["fingerprint_sha256"] = digest = fingerprint_digest(manifest["fingerprint"])
    for part in cache_dir.glob("part-*.parquet"):
        table = pq.read_table(part).drop_columns(drop)
        schema = pa.schema([pa.field(f.name, pa.float32()) if f.type == pa.float64() else f for f in table.schema])
        table = table.cast(schema).replace_schema_metadata({cache.META_FINGERPRINT: json.dumps(manifest["fingerprint"]),
                                                            cache.META_DIGEST: digest})
        pq.write_table(table, part)
    (cache_dir / cache.MANIFEST).write_text(json.dumps(manifest))
    if version < 3:  # _expected.parquet came with format 3
        (cache_dir / cache.EXPECTED).unlink()


@pytest.mark.parametrize("version, drop", [(1, ["ref_chosen_tail_logps", "ref_rejected_tail_logps", "ids_sha256"]),
                                           (2, ["ids_sha256"])])
def test_an_older_format_cache_is_refused_with_the_rebuild_command(version, drop, ld_config, tmp_path):
    import dataclasses

    from dpo_lean.precompute import run_precompute

    old = tmp_path / "old_cache"
    shutil.copytree(ld_config.resolved_ref_cache_dir, old)
    _as_old_format(old, version, drop)
    config = dataclasses.replace(ld_config, ref_cache_dir=str(old))
    for command in (scoring.prepare_run, run_precompute):  # train, and precompute without overwrite_cache
        with pytest.raises(DpoLeanError) as err:
            command(config)
        assert f"has format {version}, this dpo-lean reads formats 3 and 4" in str(err.value)
        assert "`dpo-lean precompute CONFIG.yaml overwrite_cache=true`" in str(err.value) and "\n" not in str(err.value)
    run_precompute(dataclasses.replace(config, overwrite_cache=True))  # the command it names rebuilds it
    assert len(scoring.prepare_run(config)[3]) == len(LD_ROWS)


def test_a_float32_cache_is_read_with_a_notice_and_precompute_adds_no_rows_to_it(ld_config, tmp_path, capsys):
    """The format before float64 sums (3): train reads its float32 values as they are after one `notice:` line
    (recomputing a large cache is the user's call, and its sums are off by 1e-6 of themselves at most); precompute
    computes nothing when it holds every row, refuses to add rows to it (parts of two formats do not mix), and
    rebuilds it, float64, when told."""
    import dataclasses

    import pyarrow.parquet as pq

    from dpo_lean.precompute import run_precompute

    old = tmp_path / "old_cache"
    shutil.copytree(ld_config.resolved_ref_cache_dir, old)
    _as_old_format(old, 3, [])
    config = dataclasses.replace(ld_config, ref_cache_dir=str(old))
    stored = {r["id"]: r for r in pads.dataset(old, format="parquet").to_table().to_pylist()}
    capsys.readouterr()
    ref = scoring.prepare_run(config)[3]
    notices = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "format 3" in notices[0] and "overwrite_cache=true" in notices[0], notices
    assert ref == {i: tuple(stored[i][c] for c in scoring.REF_COLUMNS) for i in stored}  # the float32 values
    assert notices[0] in cache_report.describe(old)[1]  # cache-info says it too

    files = {p.name: p.read_bytes() for p in old.iterdir()}
    summary = run_precompute(config)
    assert summary["rows"] == 0 and summary["complete"] and "notice:" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in old.iterdir()} == files  # nothing rewritten
    next(old.glob("part-*.parquet")).unlink()  # now it lacks rows
    with pytest.raises(DpoLeanError) as err:
        run_precompute(config)
    assert "has format 3" in str(err.value) and "overwrite_cache=true" in str(err.value) and "\n" not in str(err.value)

    run_precompute(dataclasses.replace(config, overwrite_cache=True))
    state = cache.scan(old)
    assert state.format_version == cache.FORMAT_VERSION and len(state.table) == len(LD_ROWS)
    assert all(pq.read_schema(p).field("ref_chosen_logps").type == "double" for p in old.glob("part-*.parquet"))
