"""Parity with TRL's DPOTrainer: the same token ids for conversational rows, the same reference log-probs.

TRL's side is a real ``trl.DPOTrainer`` built on the tiny fixture model (float32, CPU): its prepared
``train_dataset`` holds ``prompt_ids``/``chosen_ids``/``rejected_ids`` (``_prepare_dataset``), and with
``precompute_ref_log_probs=True`` also ``ref_chosen_logps``/``ref_rejected_logps`` (``_precompute_ref_logps``,
which scores each right-padded batch with the policy itself as reference when no ``ref_model`` is given).
dpo-lean's side is ``prepare_data`` (token ids) and ``run_precompute`` (the Parquet cache), on the same rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import FIXTURES, SHARED_DEMO
from make_fixtures import fixture_config

pytest.importorskip("trl")

MODEL_DIR = FIXTURES / "tiny-model"
DEMO_FILE = FIXTURES / "demo" / "demo_case.json"
SHARED_ROWS = 40
NO_CUTOFF = 1_000_000  # larger than any row: dpo-lean truncates nothing, as TRL with max_length=None
LOGP_TOL = 1e-4  # nats; measured at most 8e-6 on these rows (dpo-lean float64 sums, TRL 1.16 float32 sums)

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

# Hand-written TRL conversational rows: multi-turn, system messages, whitespace, newlines, non-ASCII text,
# a chosen reply that is a prefix of the rejected one.
MULTITURN_ROWS = [
    {"prompt": [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Name a prime number."},
                {"role": "assistant", "content": "7"},
                {"role": "user", "content": "Another one, larger than 10?"}],
     "chosen": [{"role": "assistant", "content": "11"}],
     "rejected": [{"role": "assistant", "content": "12"}]},
    {"prompt": [{"role": "system", "content": "Answer in French.\nKeep it short."},
                {"role": "user", "content": "Translate 'cat'."},
                {"role": "assistant", "content": "chat"},
                {"role": "user", "content": "And 'dog'?"},
                {"role": "assistant", "content": "chien"},
                {"role": "user", "content": "  And 'coffee with cream' (café crème)?  "}],
     "chosen": [{"role": "assistant", "content": "café crème"}],
     "rejected": [{"role": "assistant", "content": "  coffee\n\nwith cream  "}]},
    {"prompt": [{"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": "Is 91 prime?"}],
     "chosen": [{"role": "assistant", "content": "No."}],
     "rejected": [{"role": "assistant", "content": "No. Wait, yes: 91 has no divisors."}]},
    {"prompt": [{"role": "system", "content": "Be helpful — and exact."},
                {"role": "user", "content": "Summarise:\nThe cat sat on the warm mat.\n"},
                {"role": "assistant", "content": "A cat sat on a mat."},
                {"role": "user", "content": "Shorter, please."},
                {"role": "assistant", "content": "Cat on mat."},
                {"role": "user", "content": "One word?"}],
     "chosen": [{"role": "assistant", "content": "Cat."}],
     "rejected": [{"role": "assistant", "content": "Dogs bark loudly at night, naïvely."}]},
]


# ----------------------------------------------------------------------------- helpers


def _message(turn) -> dict:
    if isinstance(turn, str):
        return {"role": "assistant", "content": turn}
    if "from" in turn:
        return {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}
    return {"role": turn["role"], "content": turn["content"]}


def sharegpt_to_trl(raw_rows: list[dict]) -> list[dict]:
    """ShareGPT rows as TRL conversational rows (system turn kept in the prompt), read independently of dpo-lean."""
    out = []
    for r in raw_rows:
        prompt = [_message(t) for t in r["conversations"]]
        if r.get("system"):
            prompt = [{"role": "system", "content": r["system"]}] + prompt
        sides = {}
        for key in ("chosen", "rejected"):
            value = r[key]
            sides[key] = [_message(t) for t in value] if isinstance(value, list) else [_message(value)]
        out.append({"prompt": prompt, **sides})
    return out


def lean_config(tmp: Path, **overrides):
    """The fixture config (template auto) with output under ``tmp``, plain float32 model, no truncation."""
    from dpo_lean.config import from_dict

    raw = fixture_config(FIXTURES)
    raw.update(output_dir=str(tmp / "output"), ref_cache_dir=str(tmp / "ref_cache"), quantization_bit=None,
               cutoff_len=NO_CUTOFF, template="auto")
    raw.update(overrides)
    return from_dict(raw)


def lean_rows(config) -> dict[int, object]:
    """dpo-lean's tokenised rows by row_index; every row must be kept and none truncated."""
    from dpo_lean.data.pipeline import prepare_data
    from dpo_lean.modeling import load_tokenizer

    data = prepare_data(config, load_tokenizer(config))
    assert data.skips == [], [(s.row_index, s.reason, s.detail) for s in data.skips]
    assert data.num_truncated == 0
    return {r.row_index: r for r in data.rows}


def trl_train_dataset(rows: list[dict], output_dir: Path, precompute: bool = False):
    """TRL's prepared train dataset for ``rows``: a real DPOTrainer on a fresh float32 copy of the tiny model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(output_dir), report_to="none", max_length=None, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=8, precompute_ref_log_probs=precompute, precompute_ref_batch_size=8,
        dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if precompute:  # no ref_model: TRL scores with the policy itself, which is still the untouched base model
        assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
    assert trainer.accelerator.device.type == "cpu" and trainer.model.dtype == torch.float32
    return trainer.train_dataset


def assert_same_ids(lean: dict, trl_ds) -> None:
    """Row i of TRL's dataset equals dpo-lean's row_index i, field by field, with a readable diff on failure."""
    assert sorted(lean) == list(range(len(trl_ds)))
    for i in range(len(trl_ds)):
        theirs, ours = trl_ds[i], lean[i]
        for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
            a, b = getattr(ours, field), theirs[field]
            if a != b:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                pytest.fail(f"row {i} {field}: dpo-lean {len(a)} tokens, TRL {len(b)}; first difference at {k}: "
                            f"dpo-lean {a[k:k + 8]} vs TRL {b[k:k + 8]}")
        assert ours.chosen_ids and ours.rejected_ids  # every completion scores at least one token


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_trl_rows() -> list[dict]:
    rows = sharegpt_to_trl(json.loads(DEMO_FILE.read_text(encoding="utf-8")))
    assert any(r["prompt"][0]["role"] == "system" for r in rows)  # the fixture holds system turns too
    return rows


@pytest.fixture(scope="module")
def multiturn_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multiturn") / "multiturn.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in MULTITURN_ROWS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trl_demo_precomputed(demo_trl_rows, tmp_path_factory):
    """TRL's prepared demo dataset with precomputed reference log-probs (ids are computed before, unchanged)."""
    return trl_train_dataset(demo_trl_rows, tmp_path_factory.mktemp("trl_demo"), precompute=True)


# ----------------------------------------------------------------------------- token ids


def test_demo_token_ids_match_trl(demo_trl_rows, trl_demo_precomputed, tmp_path):
    lean = lean_rows(lean_config(tmp_path))
    assert len(lean) == len(demo_trl_rows) == 64
    assert_same_ids(lean, trl_demo_precomputed)


def test_multiturn_system_token_ids_match_trl(multiturn_file, tiny_tokenizer, tmp_path):
    lean_tokenizer = tiny_tokenizer
    trl_ds = trl_train_dataset(MULTITURN_ROWS, tmp_path / "trl")
    lean = lean_rows(lean_config(tmp_path, dataset=str(multiturn_file)))
    assert len(lean) == len(MULTITURN_ROWS)
    assert_same_ids(lean, trl_ds)
    # both split where ChatML's generation prompt ends: the completion is the reply + "<|im_end|>" + "\n"
    end = [ids[0] for ids in (lean_tokenizer.encode("<|im_end|>"), lean_tokenizer.encode("\n"))]
    for row in lean.values():
        assert row.chosen_ids[-2:] == row.rejected_ids[-2:] == end
        assert lean_tokenizer.decode(row.prompt_ids).endswith("<|im_start|>assistant\n")
    assert lean[2].chosen_ids[:3] == lean[2].rejected_ids[:3]  # "No." starts both replies; only the rest differs


def test_shared_demo_token_ids_match_trl(tmp_path):
    if not SHARED_DEMO.is_file():
        pytest.skip(f"{SHARED_DEMO} is absent")
    raw = json.loads(SHARED_DEMO.read_text(encoding="utf-8"))[:SHARED_ROWS]
    trl_ds = trl_train_dataset(sharegpt_to_trl(raw), tmp_path / "trl")
    lean = lean_rows(lean_config(tmp_path, dataset=str(SHARED_DEMO), max_samples=SHARED_ROWS))
    assert len(lean) == SHARED_ROWS
    assert_same_ids(lean, trl_ds)
    assert max(len(r.prompt_ids) + len(r.chosen_ids) for r in lean.values()) > 1000  # long rows, none cut


# ----------------------------------------------------------------------------- reference log-probs


def _lean_cache(config) -> dict[int, dict]:
    from dpo_lean import cache
    from dpo_lean.precompute import run_precompute

    summary = run_precompute(config)
    assert summary["complete"]
    state = cache.scan(config.resolved_ref_cache_dir)
    assert state.complete and not state.problems
    assert state.manifest["fingerprint"]["reference"] == {"precision": "base", "quantization": None, "dtype": "float32"}
    return {r["row_index"]: r for r in state.table.to_pylist()}


def _assert_logps_match(cached: dict[int, dict], trl_ds, lean: dict) -> float:
    assert sorted(cached) == list(range(len(trl_ds)))
    worst = 0.0
    for i in range(len(trl_ds)):
        ours, theirs = cached[i], trl_ds[i]
        assert ours["id"] == lean[i].id
        # the cache's token counts are TRL's own lengths, so the values below score the same tokens
        assert (ours["prompt_tokens"], ours["chosen_tokens"], ours["rejected_tokens"]) == (
            len(theirs["prompt_ids"]), len(theirs["chosen_ids"]), len(theirs["rejected_ids"]))
        for side in ("ref_chosen_logps", "ref_rejected_logps"):
            a, b = ours[side], theirs[side]
            assert math.isfinite(a) and a < 0
            assert abs(a - b) <= LOGP_TOL, f"row {i} {side}: dpo-lean {a:.6f}, TRL {b:.6f}"
            worst = max(worst, abs(a - b))
    return worst


def test_demo_precompute_matches_trl_ref_logps(trl_demo_precomputed, tmp_path):
    config = lean_config(tmp_path, precompute_ref_batch_size=8, cache_part_rows=16)
    cached = _lean_cache(config)
    _assert_logps_match(cached, trl_demo_precomputed, lean_rows(config))
    # the comparison is not vacuous: chosen and rejected, and different rows, get different values
    values = [cached[i]["ref_chosen_logps"] for i in cached] + [cached[i]["ref_rejected_logps"] for i in cached]
    assert len({round(v, 3) for v in values}) > len(cached)


def test_multiturn_precompute_matches_trl_ref_logps(multiturn_file, tmp_path):
    trl_ds = trl_train_dataset(MULTITURN_ROWS, tmp_path / "trl", precompute=True)
    # a batch size that differs from TRL's: padding and batch composition must not change a row's value
    config = lean_config(tmp_path, dataset=str(multiturn_file), precompute_ref_batch_size=3, cache_part_rows=3)
    _assert_logps_match(_lean_cache(config), trl_ds, lean_rows(config))
