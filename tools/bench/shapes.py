"""`tools/bench real-shapes` (or `tools/bench all --real-shapes`): the train and precompute rows at real model shapes.

The exact architectures of Qwen2.5-0.5B and Qwen2.5-1.5B (config.json values below, from the public model
configs), random weights, their real 151,936-token vocabulary, NF4 4-bit base, LoRA r=16 on every linear layer.
Tokens are random ids within the vocabulary at exact lengths: a word-level tokenizer maps the word ``w<i>`` to id
i, so a row whose prompt and completions are such words tokenises to exactly the ids drawn (the ChatML markers
around them included: the prompt is --prompt-tokens long, each completion --completion-tokens). Each contender
runs as in `tools/bench train` / `precompute` (its own process, the same rows and batches), 1 pair per step, cutoff 1024.
FLOP utilisation: achieved model FLOPs/s over this machine's fp32 matmul rate, timed in this run.
"""

from __future__ import annotations

import json
import random
import time
from argparse import Namespace
from pathlib import Path

from bench.suite import dpo_config
from bench.tables import print_table
from bench.worker import spawn

QWEN25_COMMON = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_act": "silu",
    "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_sliding_window": False, "use_cache": True,
    "bos_token_id": 151643, "eos_token_id": 151643,
}
QWEN25 = {  # Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-1.5B config.json (the base models)
    "Qwen2.5-0.5B": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "max_window_layers": 24, "sliding_window": 32768},
    "Qwen2.5-1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072,
                     "max_window_layers": 28, "sliding_window": 131072},
}
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2's pre-tokenizer pattern
TRAIN = ("dpo-lean", "sft", "trl", "trl+precompute")
# model FLOPs per token, in units of the matmul parameter count N: a forward is 2N; a LoRA step is 4N (forward 2N
# and the activation gradient 2N; the frozen base gets no weight gradient, LoRA's own ~1% is left out, and
# checkpointing's recomputed forward is not counted); TRL's reference mode adds a reference forward (2N)
TRAIN_FLOPS = {"dpo-lean": 4, "sft": 4, "trl": 6, "trl+precompute": 4}


def matmul_params(cfg: dict) -> int:
    """N: parameters that multiply every token (attention and MLP projections, biases, and the LM head)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    attention = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (bias), k and v (bias), o
    return layers * (attention + 3 * h * inter) + cfg["vocab_size"] * h


def build_shape_model(directory: Path, name: str) -> str:
    """Random-weight Qwen2.5 of ``name``'s exact shape (bf16 on disk) with the word-level tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (directory / "config.json").exists():
        return str(directory)
    config = Qwen2Config(**QWEN25_COMMON, **QWEN25[name])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory)
    del model
    word_tokenizer().save_pretrained(directory)
    return str(directory)


def word_vocab() -> tuple[dict, list, list]:
    """A byte-level BPE vocabulary of Qwen's size in which each word `` abcd`` (a space and four letters) is one
    token: (vocab, merges, the words with ids, in id order). Its ids fill 0..151642, the specials follow."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    pairs = [a + b for a in LETTERS for b in LETTERS]
    merges = [("Ġ", a) for a in LETTERS] + [("Ġ" + a, b) for a in LETTERS for b in LETTERS] + \
        [(p[0], p[1]) for p in pairs]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    words = []
    for head in pairs:
        for tail in pairs:
            if len(vocab) == SPECIAL["<|endoftext|>"]:
                break
            merges.append(("Ġ" + head, tail))
            vocab["Ġ" + head + tail] = len(vocab)
            words.append(head + tail)
    return vocab | SPECIAL, merges, words


def word_tokenizer():
    """The vocabulary above as a Qwen2-style tokenizer (its pre-tokenizer, ChatML special tokens and template),
    so transformers' Qwen2Tokenizer reloads it to the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dpo_lean.tiny import CHATML_TEMPLATE

    vocab, merges, _ = word_vocab()
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE)


def _row(rng: random.Random, words: list[str], prompt: int, completion: int) -> dict:
    """Each text starts with a two-letter word (one token without a space before it, as after a role line), then
    ``k - 1`` four-letter words (one token each with their space)."""
    first = [a + b for a in LETTERS for b in LETTERS]
    text = lambda k: " ".join([rng.choice(first)] + [rng.choice(words) for _ in range(k - 1)])  # noqa: E731
    return {"conversations": [{"from": "human", "value": text(prompt)}],
            "chosen": {"from": "gpt", "value": text(completion)},
            "rejected": {"from": "gpt", "value": text(completion)}}


def write_exact_rows(path: Path, raw: dict, n: int, prompt: int, completion: int) -> tuple[int, int]:
    """``n`` rows whose dpo-lean ids are exactly ``prompt`` / ``completion`` / ``completion`` long (the template's
    markers measured on a probe row and subtracted); returns the lengths dpo-lean sees."""
    from dpo_lean import modeling
    from dpo_lean.config import from_dict
    from dpo_lean.data.pipeline import prepare_data

    def lengths(rows):
        path.write_text(json.dumps(rows))
        config = from_dict({**raw, "dataset": str(path)})
        out = prepare_data(config, modeling.load_tokenizer(config)).rows
        return [(len(r.prompt_ids), len(r.chosen_ids), len(r.rejected_ids)) for r in out]

    words = word_vocab()[2]
    (p, c, _), = lengths([_row(random.Random(1), words, 100, 100)])
    rng = random.Random(0)
    rows = [_row(rng, words, prompt - (p - 100), completion - (c - 100)) for _ in range(n)]
    seen = lengths(rows)
    if set(seen) != {(prompt, completion, completion)}:
        raise SystemExit(f"real-shapes rows tokenise to {sorted(set(seen))}, not {(prompt, completion, completion)}")
    return prompt, completion


def matmul_rate(n: int = 2048, reps: int = 8) -> float:
    """This machine's fp32 matmul rate (FLOP/s): the best of ``reps`` timed n x n products, after one warm-up."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def run_shape(args, tmp: Path, name: str) -> dict:
    """Every train contender and the precompute pass against the bare forward, on one real shape."""
    print(f"\n{name}: building random weights", flush=True)
    model = build_shape_model(tmp / f"model-{name}", name)
    shape = Namespace(cutoff=1024, truncation="keep_start", batch=1, warmup=args.shape_warmup,
                      steps=args.shape_steps)
    raw = dpo_config(shape, model, str(tmp / f"rows-{name}.json"), tmp / name / "run")
    write_exact_rows(Path(raw["dataset"]), raw, shape.warmup + shape.steps, args.prompt_tokens,
                     args.completion_tokens)
    rate = matmul_rate()
    print(f"{name}: fp32 matmul rate {rate / 1e9:,.0f} GFLOP/s; precompute", flush=True)
    result = {"matmul_flops": rate, "n_matmul_params": matmul_params({**QWEN25_COMMON, **QWEN25[name]}),
              "precompute": {}, "train": {}}
    # the dpo-lean pass also writes the train contenders' cache; every figure is printed as soon as it is in
    for group, contender, warmup in [("precompute", "dpo-lean", 0), ("precompute", "bare-forward", 0),
                                     *[("train", c, shape.warmup) for c in args.shape_contenders]]:
        out = raw if group == "precompute" else {**raw, "output_dir": str(tmp / name / contender)}
        result[group][contender] = r = spawn(f"{group}:{contender}", out, warmup)
        print(f"{name} {group} {contender}: {json.dumps(r)}", flush=True)
    result["matmul_flops_start"], result["matmul_flops_end"] = rate, matmul_rate()
    result["matmul_flops"] = (rate + result["matmul_flops_end"]) / 2  # a shared machine's load drifts
    print_shape_tables(name, result, shape)
    return result


def _util(flops_per_s: float, rate: float) -> str:
    return f"{flops_per_s / 1e9:,.1f} | {flops_per_s / rate:.1%}"


def print_shape_tables(name: str, result: dict, shape: Namespace) -> None:
    n, rate = result["n_matmul_params"], result["matmul_flops"]
    if result["train"]:
        _print_train_table(name, result, shape, n, rate)
    _print_precompute_table(name, result, n, rate)


def _print_train_table(name: str, result: dict, shape: Namespace, n: int, rate: float) -> None:
    rows = []
    for contender, r in result["train"].items():
        if "error" in r:
            rows.append((contender, "failed: " + r["error"], *[""] * 7))
            continue
        start = r.get("start_gb")
        flops = TRAIN_FLOPS[contender] * n * r["tokens_per_second"]
        rows.append((contender, f"{r['peak_gb']:.2f}", f"{start:.2f}" if start is not None else "",
                     f"{r['peak_gb'] - start:.2f}" if start is not None else "", f"{r['step_seconds']:.1f}",
                     f"{r['tokens_per_second']:,.1f}", f"{TRAIN_FLOPS[contender]}N", _util(flops, rate)))
    print_table(f"{name} train: {shape.steps} timed step(s) after {shape.warmup} warm-up, 1 pair per step; "
                       f"N = {n / 1e6:,.0f}M matmul parameters; fp32 matmul rate {rate / 1e9:,.0f} GFLOP/s (mean of "
                       f"{result['matmul_flops_start'] / 1e9:,.0f} before and {result['matmul_flops_end'] / 1e9:,.0f} "
                       "after)",
                       rows, ("contender", "peak RSS GB", "RSS at train start GB", "peak - start GB", "step s",
                              "tokens/s", "FLOPs/token", "model GFLOP/s", "of matmul rate"))


def _print_precompute_table(name: str, result: dict, n: int, rate: float) -> None:
    rows, pre = [], result["precompute"]
    bare = pre["bare-forward"]
    for contender, r in pre.items():
        if "error" in r:
            rows.append((contender, "failed: " + r["error"], "", "", "", ""))
            continue
        tps = r["tokens"] / r["seconds"]
        vs = f"{tps / (bare['tokens'] / bare['seconds']):.2f}x" if "error" not in bare else ""
        rows.append((contender, f"{r['peak_gb']:.2f}", f"{tps:,.1f}", vs, _util(2 * n * tps, rate)))
    print_table(f"{name} precompute (the pass after loading, {pre['dpo-lean'].get('tokens', 0):,} tokens)",
                       rows, ("contender", "peak RSS GB", "tokens/s", "tokens/s / bare forward", "model GFLOP/s",
                              "of matmul rate"))


def run_real_shapes(args) -> dict:
    import tempfile

    print(f"real shapes: {', '.join(args.shapes)}; prompt {args.prompt_tokens} + completions "
          f"{args.completion_tokens} tokens each (random ids), cutoff 1024, NF4, LoRA r=16 all linear layers")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        return {name: run_shape(args, Path(tmp), name) for name in args.shapes}


def add_shape_arguments(parser) -> None:
    group = parser.add_argument_group("real shapes (tools/bench real-shapes, or all --real-shapes)")
    group.add_argument("--real-shapes", action="store_true", help="with `all`: also run the real-shape rows")
    group.add_argument("--shapes", nargs="+", choices=tuple(QWEN25), default=list(QWEN25))
    group.add_argument("--shape-steps", type=int, default=2, help="timed steps per train contender")
    group.add_argument("--shape-warmup", type=int, default=1, help="warm-up steps before them")
    group.add_argument("--shape-contenders", nargs="*", choices=TRAIN, default=list(TRAIN),
                       help="train contenders to run (none: only the precompute rows)")
    group.add_argument("--prompt-tokens", type=int, default=512)
    group.add_argument("--completion-tokens", type=int, default=256)
