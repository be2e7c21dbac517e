"""One tiny, random-weight model per model family that LLaMA-Factory 0.9.5 lists a template for and transformers has
natively, each with its family's own features on (softcapping, sliding windows, qk-norm, MoE routers, biases, logit
scales, tied or untied heads, the dropout values its real checkpoints ship).

Built in code (seeded) rather than committed: ``write_family(name, directory)`` saves the model with the tiny
tokenizer of tests/fixtures/tiny-model. The output head is scaled so the final logits are far from uniform (a
root-mean-square of about LOGIT_RMS), so a wrong mask, head or post-processing shows in the log-probs.

Values lowered from the real checkpoints so that the tiny model exercises them: sliding windows (8 positions, so the
test rows outgrow them) and Gemma's softcaps (the tiny logits and attention scores reach the tanh's bend).
"""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURE_TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "tiny-model"
LOGIT_RMS = 4.0
WINDOW = 8
_SLIDE_FULL = ["sliding_attention", "full_attention"]

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=1024, initializer_range=0.1, pad_token_id=0, bos_token_id=None,
            eos_token_id=2)

# model_type -> (what the tiny model keeps on, config values beyond BASE)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("untied head, MLP bias", dict(mlp_bias=True, tie_word_embeddings=False)),
    "mistral": ("sliding window on every layer", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    "mixtral": ("MoE router (4 experts, top 2; router logits out, as LF's moe_aux_loss_coef sets), sliding window",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW, router_jitter_noise=0.0,
                     output_router_logits=True, router_aux_loss_coef=0.02)),
    "qwen2": ("q/k/v biases, sliding window past layer 1", dict(use_sliding_window=True, sliding_window=WINDOW,
                                                                  max_window_layers=1, tie_word_embeddings=True)),
    "qwen3": ("qk-norm, tied head", dict(tie_word_embeddings=True)),
    "qwen3_moe": ("qk-norm, MoE router (4 experts, top 2)",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[])),
    "gemma": ("embedding scale, tied head, GeLU", dict(hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("final-logit and attention softcapping, alternating sliding window, post-norms",
               dict(final_logit_softcapping=5.0, attn_logit_softcapping=3.0, sliding_window=WINDOW,
                    layer_types=_SLIDE_FULL, query_pre_attn_scalar=16)),
    "gemma3_text": ("qk-norm, alternating sliding window, two RoPE bases",
                    dict(sliding_window=WINDOW, layer_types=_SLIDE_FULL, query_pre_attn_scalar=16)),
    "gemma4_text": ("final-logit softcapping, per-layer inputs, alternating sliding window",
                    dict(final_logit_softcapping=5.0, sliding_window=WINDOW, layer_types=_SLIDE_FULL,
                         hidden_size_per_layer_input=8)),
    "phi": ("partial rotary, parallel block, biased head, resid_pdrop 0.1 (phi-2)",
            dict(resid_pdrop=0.1, partial_rotary_factor=0.5, tie_word_embeddings=False)),
    "phi3": ("fused qkv and gate_up, sliding window", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    "glm4": ("attention biases, partial rotary, post-norms", dict(attention_bias=True, partial_rotary_factor=0.5)),
    "granite": ("logits_scaling 8, embedding/residual/attention multipliers",
                dict(logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                     attention_multiplier=0.0625, tie_word_embeddings=True)),
    "olmo2": ("qk-norm, post-norms", dict(tie_word_embeddings=False)),
    "olmo3": ("qk-norm, alternating sliding window", dict(sliding_window=WINDOW, layer_types=_SLIDE_FULL)),
    "gpt_neox": ("parallel residual, partial rotary, biases",
                 dict(use_parallel_residual=True, rotary_pct=0.25, attention_bias=True, hidden_dropout=0.0)),
    "stablelm": ("qk layernorm, parallel residual, qkv bias, partial rotary",
                 dict(qk_layernorm=True, use_parallel_residual=True, use_qkv_bias=True, partial_rotary_factor=0.25)),
    "smollm3": ("no-RoPE layers, tied head", dict(no_rope_layer_interval=2, tie_word_embeddings=True)),
    "gpt_oss": ("MoE router with bias, attention sinks, alternating sliding window",
                dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=WINDOW,
                     layer_types=_SLIDE_FULL, max_position_embeddings=131072)),  # YaRN's own context
    "deepseek_v3": ("multi-head latent attention, grouped MoE router, a dense first layer",
                    dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                         n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                         moe_intermediate_size=32, n_shared_experts=1, num_key_value_heads=4, head_dim=8)),
    "ernie4_5": ("tied head", dict(use_bias=False, tie_word_embeddings=True)),
    "exaone4": ("qk-norm, alternating sliding window", dict(sliding_window=WINDOW, layer_types=_SLIDE_FULL)),
    "qwen3_5_text": ("gated delta-net (linear attention) layers beside full attention",
                     dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16,
                          linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)),
    "lfm2": ("short convolutions beside attention", dict(layer_types=["conv", "full_attention"],
                                                          block_auto_adjust_ff_dim=False)),
    "cohere": ("logit_scale 0.0625, parallel block, layernorm", dict(logit_scale=0.0625)),
    "cohere2": ("logit_scale 0.25, alternating sliding window",
                dict(logit_scale=0.25, sliding_window=WINDOW, layer_types=_SLIDE_FULL)),
    "starcoder2": ("biases, sliding window, residual/embedding/attention dropout 0.1 (as shipped)",
                   dict(use_bias=True, sliding_window=WINDOW, residual_dropout=0.1, embedding_dropout=0.1,
                        attention_dropout=0.1, hidden_act="gelu_pytorch_tanh")),
    "seed_oss": ("q/k/v biases, residual and attention dropout 0.1 (as shipped)",
                 dict(attention_bias=True, attention_out_bias=False, residual_dropout=0.1, attention_dropout=0.1)),
}


def family_config(name: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    config = AutoConfig.for_model(name, **{**BASE, "vocab_size": vocab_size, **FAMILIES[name][1], **overrides})
    if name == "gemma4_text":
        config.vocab_size_per_layer_input = vocab_size
    return config


@torch.no_grad()
def build_family(name: str, vocab_size: int, seed: int = 0, **overrides):
    """The tiny model of family ``name`` (random weights, seeded), its head scaled to logits of rms ~LOGIT_RMS;
    ``overrides``: config values to change."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, vocab_size, **overrides), dtype=torch.float32)
    model.eval()
    ids = torch.randint(3, vocab_size, (1, 24), generator=torch.Generator().manual_seed(seed))
    rms = model(input_ids=ids).logits.pow(2).mean().sqrt().item()
    head = model.get_output_embeddings()
    head.weight.mul_(LOGIT_RMS / rms)  # tied: the embeddings too, which the norms absorb
    if getattr(head, "bias", None) is not None:
        head.bias.normal_(0, 1.0)
    return model


def write_family(name: str, directory: str | Path, seed: int = 0, tokenizer: str | Path = FIXTURE_TOKENIZER,
                 spare_tokens: int = 0) -> Path:
    """Save the tiny model of ``name`` with ``tokenizer`` (the fixture's by default) to ``directory``;
    ``spare_tokens`` rows of embedding past the tokenizer (for the tokens a template's fix-ups add)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    loaded = AutoTokenizer.from_pretrained(tokenizer)
    loaded.save_pretrained(directory)
    build_family(name, len(loaded) + spare_tokens, seed).save_pretrained(directory)
    return directory
