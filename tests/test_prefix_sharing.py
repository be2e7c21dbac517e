"""Prefix sharing: [prompt | chosen | rejected] in one sequence scores exactly like two sequences."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpo_lean import modeling, scoring
from dpo_lean.data.pipeline import prepare_data
from dpo_lean.errors import DpoLeanError
from dpo_lean.layout import Sharing, collate, collate_pairs, collate_shared, layout_flops, prefix_sharing, shared_attention_mask
from dpo_lean.logprobs import batch_logps


def test_mask_by_hand():
    # prompt 2, chosen 2, rejected 1, one padding position
    allowed = shared_attention_mask(2, 2, 1, 6, torch.float32) == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # chosen sees the prompt and earlier chosen
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # rejected sees the prompt and itself, never chosen
        [0, 0, 0, 0, 0, 1],  # padding sees only itself
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert torch.equal(shared_attention_mask(2, 2, 1, 6, torch.bool), expected)  # what SDPA gets


def test_positions_and_scored_tokens_by_hand():
    batch = collate_shared([[10, 11]], [[20, 21]], [[30]], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]  # rejected restarts after the prompt
    # chosen 20 <- position 1, 21 <- 2; rejected 30 <- position 1 (the last prompt position)
    assert batch["score_index"].tolist() == [1, 2, 1]
    assert batch["score_targets"].tolist() == [20, 21, 30]
    assert batch["score_segment"].tolist() == [0, 0, 1]
    assert batch["num_tokens"] == collate_pairs([[10, 11]], [[20, 21]], [[30]], 0)["num_tokens"] == 7


def _rows(tiny_config, tiny_tokenizer, tmp_path):
    """Fixture rows (some with a system message) plus multi-turn rows, cut by a small cutoff_len."""
    import json

    turns = [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Name a colour."},
             {"from": "gpt", "value": "Red."}, {"from": "human", "value": "Another one, and a fruit?"}]
    extra = [{"conversations": turns[i:], "chosen": {"from": "gpt", "value": "Blue and apple " * (k + 1)},
              "rejected": {"from": "gpt", "value": "no"}} for i, k in ((0, 1), (1, 6), (0, 12))]
    path = tmp_path / "multi.json"
    path.write_text(json.dumps(extra))
    config = tiny_config(copy_cache=False, dataset=f"demo_case,{path}", cutoff_len=40)
    data = prepare_data(config, tiny_tokenizer)
    assert data.num_truncated > 0 and any(len(r.prompt_ids) > 30 for r in data.rows)
    return config, data.rows[:8] + data.rows[-3:]


def test_shared_equals_two_sequences_in_value_and_lora_gradient(tiny_config, tiny_tokenizer, tmp_path):
    config, rows = _rows(tiny_config, tiny_tokenizer, tmp_path)
    policy = modeling.prepare_policy(config)
    lora = [p for p in policy.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for p in lora:  # move LoRA off its zero start so gradients reach every adapter weight
        p.data.normal_(0, 0.05)
    policy.train()
    ids = [r.prompt_ids for r in rows], [r.chosen_ids for r in rows], [r.rejected_ids for r in rows]
    weights = torch.randn(2 * len(rows))  # an arbitrary upstream gradient per completion
    results = []
    for batch in (collate_pairs(*ids, pad_id=0), collate_shared(*ids, pad_id=0)):
        logps = batch_logps(policy, batch)
        results.append((logps.detach(), torch.autograd.grad((logps * weights).sum(), lora)))
    (two, g_two), (one, g_one) = results
    assert (one - two).abs().max().item() < 1e-4
    for a, b in zip(g_one, g_two):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_a_model_that_cannot_take_the_mask_falls_back_with_one_warning(tiny_config, monkeypatch):
    config = tiny_config(copy_cache=False)
    model = modeling.prepare_reference(config)
    sharing = prefix_sharing(config, model, torch.float32)
    assert sharing is not None and not sharing.always  # auto: where it pays
    assert sharing.hidden_size == model.config.hidden_size
    assert sharing.intermediate_size == model.config.intermediate_size
    assert prefix_sharing(tiny_config(copy_cache=False, prefix_sharing=True), model, torch.float32).always
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, position_ids=None, **kw: forward(*a, **kw))  # drops positions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prefix_sharing(config, model, torch.float32) is None
    assert len([w for w in caught if "prefix sharing" in str(w.message)]) == 1
    with pytest.raises(DpoLeanError, match="prefix_sharing"):
        prefix_sharing(tiny_config(copy_cache=False, prefix_sharing=True), model, torch.float32)
    assert prefix_sharing(tiny_config(copy_cache=False, prefix_sharing=False), model, torch.float32) is None


def test_layout_flops_by_hand():
    # 2 rows padded to width 5, H 2, I 4: 2 * 5 * (8*2*2 + 6*2*4 + 4*5*2) = 10 * (32 + 48 + 40)
    assert layout_flops([3, 5], hidden_size=2, intermediate_size=4) == 1200


def test_auto_shares_the_batches_where_the_prompt_outweighs_the_longer_attention():
    sharing = Sharing(torch.bool, hidden_size=64, intermediate_size=256)
    # H 64, I 256: projections 8*64*64 + 6*64*256 = 131,072 FLOPs a token, attention 256 a key
    # prompt 200, completions 10 and 10: two rows of 210 cost 2*210*(131072 + 256*210) = 77.6M,
    # one row of 220 costs 220*(131072 + 256*220) = 41.2M -> shared
    prompt_heavy = ([list(range(200))], [[1] * 10], [[2] * 10])
    # prompt 1, completions 300 and 300: two rows of 301 cost 602*(131072 + 256*301) = 125.3M,
    # one row of 601 costs 601*(131072 + 256*601) = 171.2M -> two sequences
    completion_heavy = ([[5]], [[1] * 300], [[2] * 300])
    assert sharing.pays(*prompt_heavy) and not sharing.pays(*completion_heavy)
    assert "position_ids" in collate(*prompt_heavy, pad_id=0, sharing=sharing)
    assert collate(*completion_heavy, pad_id=0, sharing=sharing)["input_ids"].shape == (2, 301)
    always = Sharing(torch.bool, hidden_size=64, intermediate_size=256, always=True)
    assert collate(*completion_heavy, pad_id=0, sharing=always)["input_ids"].shape == (1, 601)
    assert collate(*prompt_heavy, pad_id=0, sharing=None)["input_ids"].shape == (2, 210)


def _count_layouts(monkeypatch, module) -> dict:
    """Wrap ``module.collate`` to count the batches it builds in each layout."""
    counts = {"shared": 0, "two sequences": 0}
    real = collate  # the module's own, even where an earlier call wrapped it

    def counting(*args, **kwargs):
        batch = real(*args, **kwargs)
        counts["shared" if "position_ids" in batch else "two sequences"] += 1
        return batch

    monkeypatch.setattr(module, "collate", counting)
    return counts


def test_the_cache_serves_either_layout(tiny_config, tmp_path, monkeypatch):
    """A cache computed without prefix sharing passes train's fingerprint check with it, and agrees in value."""
    from dpo_lean import cache, precompute
    from dpo_lean.precompute import run_precompute

    counts = _count_layouts(monkeypatch, precompute)
    run_precompute(tiny_config(copy_cache=False, prefix_sharing=True, ref_cache_dir=str(tmp_path / "one")))
    assert counts["shared"] > 0 and counts["two sequences"] == 0, counts
    run_precompute(tiny_config(copy_cache=False, prefix_sharing=False, ref_cache_dir=str(tmp_path / "two")))
    assert counts["two sequences"] == counts["shared"], counts
    scoring.prepare_run(tiny_config(copy_cache=False, prefix_sharing=True, ref_cache_dir=str(tmp_path / "two")))
    shared = cache.scan(tmp_path / "one").table.sort_by("row_index").to_pydict()
    separate = cache.scan(tmp_path / "two").table.sort_by("row_index").to_pydict()
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert max(abs(a - b) for a, b in zip(shared[column], separate[column])) < 1e-4


def test_training_with_and_without_prefix_sharing_agrees(tiny_config, tmp_path, monkeypatch):
    import json

    from dpo_lean import scoring
    from dpo_lean.train import run_train

    finals, layouts = [], []
    for shared in (True, False):
        counts = _count_layouts(monkeypatch, scoring)  # training's collator
        layouts.append(counts)
        config = tiny_config(prefix_sharing=shared, max_steps=4, logging_steps=4, save_strategy="no",
                             learning_rate=5e-3, pref_beta=0.5, per_device_train_batch_size=4,
                             output_dir=str(tmp_path / f"shared-{shared}"))
        run_train(config)
        finals.append(json.loads((config.metrics_dir / "summary.json").read_text())["final"])
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert abs(finals[0][key] - finals[1][key]) < 1e-4, key
    assert layouts[0]["shared"] >= 4 and layouts[0]["two sequences"] == 0, layouts  # the runs compared what they say
    assert layouts[1]["shared"] == 0 and layouts[1]["two sequences"] >= 4, layouts
    assert finals[0]["tokens_per_second"] > 0


@pytest.mark.parametrize("layout", ["pairs", "shared"])
def test_collate_refuses_a_pair_without_prompt_tokens(layout):
    """The last prompt position predicts the first completion token: with no prompt it would be position -1,
    the previous row's last hidden state. Collate refuses instead of scoring the wrong state."""
    fn = collate_pairs if layout == "pairs" else collate_shared
    with pytest.raises(ValueError, match="no prompt tokens"):
        fn([[10, 11], []], [[20], [21, 22]], [[30], [31]], pad_id=0)


# ---------------------------------------------------------------- sliding windows


def _sliding_model(kind: str, window: int = 48, attention: str = "sdpa"):
    """A tiny random model with a sliding window (2 layers), built like dpo_lean.tiny: Qwen2 with use_sliding_window
    on every layer or past max_window_layers (one full, one sliding layer), Mistral (every layer), Gemma 3
    (alternating layer types)."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, attn_implementation=attention)
    configs = {
        "qwen2": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=0),
        "qwen2-mixed": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=window, max_window_layers=1),
        "mistral": lambda: MistralConfig(**common, sliding_window=window),
        "gemma3": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=window,
                                           layer_types=["sliding_attention", "full_attention"]),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[kind]())
    modeling.defer_output_head(model)
    return model.eval()


LONG_ROWS = ([list(range(3, 43)), list(range(50, 62))], [list(range(100, 130)), list(range(140, 148))],
             [list(range(200, 225)), list(range(230, 239))])  # prompts 40 and 12, completions 30/25 and 8/9


def test_window_layout_is_what_transformers_applies_to_two_sequences():
    from types import SimpleNamespace

    from dpo_lean.layout import WindowLayout, window_layout

    assert window_layout(_sliding_model("qwen2")) == WindowLayout(48, None)  # every layer slides: one mask
    assert window_layout(_sliding_model("mistral")) == WindowLayout(48, None)  # no layer_types: every layer
    both = ("full_attention", "sliding_attention")
    assert window_layout(_sliding_model("qwen2-mixed")) == WindowLayout(48, both)  # a mask per layer type
    assert window_layout(_sliding_model("gemma3")) == WindowLayout(48, both)
    assert window_layout(_sliding_model("qwen2", window=None)) == WindowLayout()
    no_window = SimpleNamespace(config=SimpleNamespace(layer_types=["full_attention"] * 2, sliding_window=48))
    assert window_layout(no_window) == WindowLayout()  # Qwen2 with max_window_layers >= layers: no layer slides
    hybrid = SimpleNamespace(config=SimpleNamespace(layer_types=["linear_attention", "full_attention"], sliding_window=None))
    assert "linear_attention" in window_layout(hybrid)


@pytest.mark.parametrize("kind,attention", [("qwen2", "sdpa"), ("qwen2-mixed", "sdpa"), ("mistral", "sdpa"),
                                            ("gemma3", "sdpa"), ("qwen2-mixed", "eager")])
def test_shared_equals_two_sequences_past_the_sliding_window(tiny_config, kind, attention):
    """Window 48: longer than the startup check's pair (37 positions), shorter than the rows (70). A full causal
    shared mask bypasses the window (0.04-0.24 nats off); the windowed one equals two sequences."""
    model = _sliding_model(kind, attention=attention)
    sharing = prefix_sharing(tiny_config(copy_cache=False, prefix_sharing=True), model, torch.float32)
    assert sharing is not None and sharing.window == 48
    shared = collate(*LONG_ROWS, pad_id=0, sharing=sharing)
    assert "position_ids" in shared  # the shared layout, not two sequences
    with torch.no_grad():
        two = batch_logps(model, collate_pairs(*LONG_ROWS, pad_id=0))
        one = batch_logps(model, shared)
    assert (one - two).abs().max().item() < 1e-4


def test_the_startup_check_exercises_the_window(tiny_config, monkeypatch):
    """A wrong window layout (the full layer of a mixed model windowed too) fails the check, though the model's real
    window is longer than the check's pair: the check shrinks the window so the pair crosses it."""
    from dpo_lean import layout as sharing_module

    model = _sliding_model("qwen2-mixed")
    monkeypatch.setattr(sharing_module, "window_layout", lambda m: sharing_module.WindowLayout(48, None))
    with pytest.raises(DpoLeanError, match="differ from two sequences"):
        prefix_sharing(tiny_config(copy_cache=False, prefix_sharing=True), model, torch.float32)
    assert model.config.sliding_window == 48  # restored after the check


# ---------------------------------------------------------------- the startup check's tolerance


def test_sharing_tolerance_by_hand():
    from dpo_lean.layout import sharing_tolerance

    # bf16, 2 layers, n = 256: 2 * 4 * sqrt(3) * (2^-8 + 16 * 2^-24) * 10 = 8 * 1.7320508 * 0.0039072037 * 10
    got = sharing_tolerance(torch.tensor([10.0, 1.0]), num_layers=2, inner=256, dtype=torch.bfloat16)
    torch.testing.assert_close(got, torch.tensor([0.5413980, 0.0541398]), rtol=1e-6, atol=0)
    # fp32, 28 layers, n = 18944: 2 * 4 * sqrt(29) * (1 + 137.637) * 2^-24 * 2 = 7.1200e-4
    got = sharing_tolerance(torch.tensor([2.0]), num_layers=28, inner=18944, dtype=torch.float32)
    torch.testing.assert_close(got, torch.tensor([7.1200e-4]), rtol=1e-4, atol=0)


def _bf16_model(head_scale: float, seed: int = 2):
    """The tiny architecture in bf16 with its logits scaled: bf16 noise in nats grows with the logits' size."""
    from dpo_lean.tiny import build_model

    model = build_model(vocab_size=1024, hidden_size=64, num_layers=2, seed=seed).to(torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    modeling.defer_output_head(model)
    return model.eval()


def _leaky_mask(monkeypatch):
    """A broken shared mask: rejected tokens see the chosen ones (as if the model ignored the 4-D mask)."""
    import dpo_lean.layout as collate_module

    real = collate_module.shared_attention_mask
    monkeypatch.setattr(collate_module, "shared_attention_mask",
                        lambda p, c, r, width, dtype, window=None: real(p + c, 0, r, width, dtype, window))


@pytest.mark.parametrize("head_scale", [0.01, 300.0])
def test_bf16_check_passes_rounding_and_fails_a_real_disagreement(tiny_config, monkeypatch, capsys, head_scale):
    """In bf16 on CPU, with small logits (a real leak moves the log-probs by ~1e-3 nats, under a fixed 2e-2) and
    large ones (rounding alone moves them by ~0.3 nats, over it): the check takes the correct layout, prints the
    measured difference once, and refuses the leaking one."""
    config = tiny_config(copy_cache=False, prefix_sharing=True)
    model = _bf16_model(head_scale)
    assert prefix_sharing(config, model, torch.bfloat16) is not None
    out = capsys.readouterr().out
    assert out.count("prefix sharing check: shared and two-sequence log-probs differ by") == 1 and "bfloat16" in out
    _leaky_mask(monkeypatch)
    with pytest.raises(DpoLeanError, match="differ from two sequences by"):
        prefix_sharing(config, model, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("quantization_bit", [4, None])
def test_cuda_bf16_check_passes_the_tiny_model_and_fails_a_leak(tiny_config, monkeypatch, capsys, quantization_bit):
    """On a GPU in bf16 (the layouts run different SDPA kernels there): the check passes, and refuses a leaking mask."""
    config = tiny_config(copy_cache=False, prefix_sharing=True, bf16=True, quantization_bit=quantization_bit)
    model = modeling.prepare_reference(config)
    assert next(model.parameters()).is_cuda
    assert prefix_sharing(config, model, torch.bfloat16) is not None
    print(capsys.readouterr().out)  # the measured difference, for tools/gpu_check.sh's log
    _leaky_mask(monkeypatch)
    with pytest.raises(DpoLeanError, match="differ from two sequences by"):
        prefix_sharing(config, model, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_shared_equals_two_sequences_past_the_sliding_window(tiny_config):
    """On a GPU (SDPA's CUDA kernels, float32): the windowed shared mask on a model with full and sliding layers
    (a full causal mask is 0.04 nats off here)."""
    model = _sliding_model("qwen2-mixed").to("cuda")
    sharing = prefix_sharing(tiny_config(copy_cache=False, prefix_sharing=True), model, torch.float32)
    assert sharing is not None and sharing.window == 48
    with torch.no_grad():
        two = batch_logps(model, modeling.batch_to(collate_pairs(*LONG_ROWS, pad_id=0), torch.device("cuda")))
        one = batch_logps(model, modeling.batch_to(collate(*LONG_ROWS, pad_id=0, sharing=sharing), torch.device("cuda")))
    assert (one - two).abs().max().item() < 1e-3
