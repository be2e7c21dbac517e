"""A tiny offline causal LM and a generated preference set with a learnable rule.

The model is a real transformers architecture (Qwen2) with random weights and a byte-level BPE
tokenizer trained here with the ``tokenizers`` library, saved in Hugging Face format, so
``from_pretrained(directory)`` loads it with no network. Tests, the demo and the benchmark use it.

The demo rule: a prompt asks for some words in upper or in lower case; the chosen answer obeys,
the rejected answer uses the other case. A policy that learns the rule ranks chosen above rejected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud garden window candle forest bread silver mountain letter tiger paper "
    "orange winter bottle castle engine island pencil rabbit summer basket dragon mirror planet "
    "ribbon shadow violin wagon anchor butter circle desert feather hammer jungle kettle lemon "
    "marble needle ocean pepper rocket saddle tunnel velvet walnut yellow zebra copper meadow"
).split()
SYSTEMS = ("You are a careful assistant.", "Follow the instruction exactly.")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ENGLISH = (
    "The quick brown fox jumps over the lazy dog. A user asks a question and the assistant answers it. "
    "Please write a short answer. What is the capital of France? Paris is the capital of France. "
    "Explain how a computer works, step by step, in simple words. Thank you! Here is the code:\n"
    "def main():\n    print('hello, world')\n\nNumbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. "
)


def demo_row(rng: random.Random) -> dict:
    """One ShareGPT-layout preference row following the case rule."""
    words = rng.sample(WORDS, rng.randint(2, 4))
    case = rng.choice(("upper", "lower"))
    ask = f"Write these words in {case} case: {' '.join(w.capitalize() for w in words)}"
    upper, lower = " ".join(words).upper(), " ".join(words).lower()
    good, bad = (upper, lower) if case == "upper" else (lower, upper)
    conversation = [{"from": "human", "value": ask}]
    if rng.random() < 0.25:
        conversation.insert(0, {"from": "system", "value": rng.choice(SYSTEMS)})
    return {"conversations": conversation, "chosen": {"from": "gpt", "value": good},
            "rejected": {"from": "gpt", "value": bad}}


def demo_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [demo_row(rng) for _ in range(n)]


def write_demo_dataset(directory: str | Path, n: int = 2000, seed: int = 0, name: str = "demo_case") -> Path:
    """Write ``<name>.json`` and a LLaMA-Factory ``dataset_info.json`` that registers it; return the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(demo_rows(n, seed), indent=1) + "\n", encoding="utf-8")
    info = {name: {"file_name": f"{name}.json", "ranking": True, "formatting": "sharegpt",
                   "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return directory


def _tokenizer_corpus() -> list[str]:
    rows = demo_rows(400, seed=12345)
    texts = [ENGLISH] * 20
    for r in rows:
        texts += [t["value"] for t in r["conversations"]] + [r["chosen"]["value"], r["rejected"]["value"]]
    texts += [" ".join(WORDS), " ".join(WORDS).upper(), " ".join(w.capitalize() for w in WORDS)]
    return texts


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE)


def build_model(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                intermediate_size: int | None = None, max_positions: int = 4096):
    """A Qwen2 causal LM with random weights (seeded, the same on every machine and release: fill_stable_weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=False, attention_dropout=0.0,
        pad_token_id=0, bos_token_id=None, eos_token_id=2)
    model = Qwen2ForCausalLM(config)
    fill_stable_weights(model, seed, std=config.initializer_range)
    return model


def fill_stable_weights(model, seed: int, std: float) -> None:
    """Every weight matrix uniform with standard deviation ``std``, norms 1, biases 0, drawn from numpy's legacy
    ``RandomState``, whose stream numpy keeps bit for bit across releases and machines (integer arithmetic only).
    torch's generator and transformers' initialisers may change between releases; committed fixtures must not."""
    import numpy as np
    import torch

    rng, half_width = np.random.RandomState(seed), std * 3**0.5
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                values = rng.uniform(-half_width, half_width, size=tuple(p.shape))
                p.copy_(torch.from_numpy(values.astype(np.float32)))


def write_tiny_model(directory: str | Path, vocab_size: int | None = None, hidden_size: int = 64,
                     num_layers: int = 2, seed: int = 0) -> Path:
    """Build and save tokenizer + model to ``directory``; ``vocab_size`` pads the embedding past the tokenizer."""
    directory = Path(directory)
    tokenizer = build_tokenizer()
    model = build_model(vocab_size or len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory
