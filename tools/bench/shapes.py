"""`tools/bench real-shapes` (or `tools/bench all --real-shapes`): the train and precompute rows at real model shapes.

The exact architectures of Qwen2.5-0.5B, 1.5B and 7B (config.json values below, from the public model configs),
random weights, their real vocabularies, NF4 4-bit base, LoRA r=16 on every linear layer. Tokens are random ids
within the vocabulary at exact lengths: a word-level tokenizer maps the word ``w<i>`` to id i, so a row whose prompt
and completions are such words tokenises to exactly the ids drawn (the ChatML markers around them included: the
prompt is --prompt-tokens long, each completion --completion-tokens). Each contender runs as in `tools/bench
train` / `precompute` (its own process, the same rows and batches), 1 pair per step, cutoff --shape-cutoff.
FLOP utilisation: achieved model FLOPs/s over this machine's matmul rate, timed in this run (fp32 on CPU; bf16,
8192^3, on a GPU). On a GPU the models are built on the GPU (random init there, then saved), and memory is CUDA's
peak allocated and peak reserved. --json is rewritten after every contender, so a run cut short keeps its figures.
The ``tiny`` shape (hidden 64, 2 layers, Qwen's vocabulary) is for dry runs of this code, not for figures.
"""

from __future__ import annotations

import json
import random
import statistics
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
QWEN25 = {  # Qwen/Qwen2.5-0.5B, -1.5B and -7B config.json (the base models)
    "Qwen2.5-0.5B": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "max_window_layers": 24, "sliding_window": 32768},
    "Qwen2.5-1.5B": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072,
                     "max_window_layers": 28, "sliding_window": 131072},
    "Qwen2.5-7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 131072,
                   "max_window_layers": 28, "sliding_window": 131072, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}
SHAPES = {**QWEN25, "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                             "max_window_layers": 2, "sliding_window": 4096, "vocab_size": 2048,
                             "bos_token_id": 2045, "eos_token_id": 2045}}  # its word tokenizer: 2,045 ids
SPECIAL = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}  # Qwen's; a shape whose
# bos_token_id (<|endoftext|>'s id) is n has a word tokenizer of n ids and the three specials from n on
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


def shape_config(name: str) -> dict:
    return {**QWEN25_COMMON, **SHAPES[name]}


def build_shape_model(directory: Path, name: str) -> str:
    """Random-weight Qwen2.5 of ``name``'s exact shape (bf16 on disk) with the word-level tokenizer; initialised
    on the GPU where there is one (a 7B model's random init on CPU takes minutes)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (directory / "config.json").exists():
        return str(directory)
    config = Qwen2Config(**shape_config(name))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    word_tokenizer(config.bos_token_id).save_pretrained(directory)
    return str(directory)


def specials(n_ids: int = SPECIAL["<|endoftext|>"]) -> dict[str, int]:
    return {name: n_ids + i for i, name in enumerate(SPECIAL)}


def word_vocab(n_ids: int = SPECIAL["<|endoftext|>"]) -> tuple[dict, list, list]:
    """A byte-level BPE vocabulary in which each word `` abcd`` (a space and four letters) is one token: (vocab,
    merges, the words with ids, in id order). Its ids fill 0..n_ids - 1 (Qwen's 151,643 by default), the specials
    follow."""
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
            if len(vocab) == n_ids:
                break
            merges.append(("Ġ" + head, tail))
            vocab["Ġ" + head + tail] = len(vocab)
            words.append(head + tail)
    return vocab | specials(n_ids), merges, words


def word_tokenizer(n_ids: int = SPECIAL["<|endoftext|>"]):
    """The vocabulary above as a Qwen2-style tokenizer (its pre-tokenizer, ChatML special tokens and template),
    so transformers' Qwen2Tokenizer reloads it to the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dpo_lean.tiny import CHATML_TEMPLATE

    vocab, merges, _ = word_vocab(n_ids)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials(n_ids)))
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
    write_rows_of_lengths(path, raw, [(prompt, completion)] * n)
    return prompt, completion


def write_rows_of_lengths(path: Path, raw: dict, lengths: list[tuple[int, int]]) -> None:
    """One row per (prompt, completion) in ``lengths``, each tokenising to exactly those lengths (both completions
    ``completion`` long)."""
    from dpo_lean import modeling
    from dpo_lean.config import from_dict
    from dpo_lean.data.pipeline import prepare_data

    def tokenised(rows):
        path.write_text(json.dumps(rows))
        config = from_dict({**raw, "dataset": str(path)})
        out = prepare_data(config, modeling.load_tokenizer(config)).rows
        return [(len(r.prompt_ids), len(r.chosen_ids), len(r.rejected_ids)) for r in out]

    words = word_vocab(json.loads((Path(raw["model_name_or_path"]) / "config.json").read_text())["bos_token_id"])[2]
    (p, c, _), = tokenised([_row(random.Random(1), words, 8, 8)])  # short: it must fit any cutoff_len
    rng = random.Random(0)
    rows = [_row(rng, words, prompt - (p - 8), completion - (c - 8)) for prompt, completion in lengths]
    seen = tokenised(rows)
    if sorted(seen) != sorted((prompt, completion, completion) for prompt, completion in lengths):
        raise SystemExit(f"real-shapes rows tokenise to {sorted(set(seen))}, not {sorted(set(lengths))}")


def matmul_rate(n: int = 2048, reps: int = 8) -> float:
    """This machine's matmul rate (FLOP/s): on a GPU, the median of 10 bf16 8192^3 products timed with CUDA
    events after 3 warm-ups, on random data; on CPU, the best of ``reps`` fp32 n x n products after one warm-up."""
    import torch

    if torch.cuda.is_available():
        return _cuda_bf16_matmul_rate()
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _cuda_bf16_matmul_rate(n: int = 8192, warmup: int = 3, reps: int = 10) -> float:
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b, out
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times)


def run_shape(args, tmp: Path, name: str, save=lambda result: None) -> dict:
    """Every train contender and the precompute pass against the bare forward, on one real shape; ``save`` gets the
    figures so far after every contender."""
    print(f"\n{name}: building random weights", flush=True)
    t0 = time.perf_counter()
    model = build_shape_model(tmp / f"model-{name}", name)
    shape = Namespace(cutoff=args.shape_cutoff, truncation="keep_start", batch=1, warmup=args.shape_warmup,
                      steps=args.shape_steps)
    raw = {**dpo_config(shape, model, str(tmp / f"rows-{name}.json"), tmp / name / "run"), "flash_attn": args.attn}
    write_exact_rows(Path(raw["dataset"]), raw, shape.warmup + shape.steps, args.prompt_tokens,
                     args.completion_tokens)
    rate = matmul_rate(512 if name == "tiny" else 2048)  # the tiny shape is for dry runs: its rate is no figure
    print(f"{name}: model and rows ready in {time.perf_counter() - t0:.1f} s; {_rate_name()} matmul rate "
          f"{rate / 1e9:,.0f} GFLOP/s; precompute", flush=True)
    result = {"matmul_flops": rate, "matmul_flops_start": rate, "matmul": _rate_name(), "attention": args.attn,
              "cutoff": shape.cutoff, "n_matmul_params": matmul_params(shape_config(name)),
              "precompute": {}, "train": {}}
    # the dpo-lean pass also writes the train contenders' cache; every figure is printed as soon as it is in
    for group, contender, warmup in [("precompute", "dpo-lean", 0),
                                     *[("train", c, shape.warmup) for c in args.shape_contenders],
                                     *[("precompute", c, 0) for c in args.shape_precompute]]:
        out = raw if group == "precompute" else {**raw, "output_dir": str(tmp / name / contender)}
        result[group][contender] = r = spawn(f"{group}:{contender}", out, warmup)
        print(f"{name} {group} {contender}: {json.dumps(r)}", flush=True)
        save(result)
    result["matmul_flops_end"] = matmul_rate(512 if name == "tiny" else 2048)
    result["matmul_flops"] = (rate + result["matmul_flops_end"]) / 2  # a shared machine's load drifts
    save(result)
    print_shape_tables(name, result, shape)
    return result


def _rate_name() -> str:
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def _util(flops_per_s: float, rate: float) -> str:
    return f"{flops_per_s / 1e9:,.1f} | {flops_per_s / rate:.1%}"


def _memory(r: dict) -> tuple[str, str]:
    """(peak, peak reserved) as printed: CUDA allocated and reserved on a GPU, RSS and nothing on CPU."""
    reserved = r.get("reserved_gb")
    return f"{r['peak_gb']:.2f}", f"{reserved:.2f}" if reserved is not None else "-"


def print_shape_tables(name: str, result: dict, shape: Namespace) -> None:
    n, rate = result["n_matmul_params"], result["matmul_flops"]
    if result["train"]:
        _print_train_table(name, result, shape, n, rate)
    if result["precompute"]:
        _print_precompute_table(name, result, n, rate)


def _print_train_table(name: str, result: dict, shape: Namespace, n: int, rate: float) -> None:
    rows = []
    for contender, r in result["train"].items():
        if "error" in r:
            rows.append((contender, "failed: " + r["error"], *[""] * 8))
            continue
        start = r.get("start_gb")
        flops = TRAIN_FLOPS[contender] * n * r["tokens_per_second"]
        rows.append((contender, *_memory(r), f"{start:.2f}" if start is not None else "",
                     f"{r['peak_gb'] - start:.2f}" if start is not None else "", f"{r['step_seconds']:.2f}",
                     f"{r['tokens_per_second']:,.1f}", f"{TRAIN_FLOPS[contender]}N", _util(flops, rate)))
    gpu = result.get("matmul") == "bf16"
    print_table(f"{name} train: {shape.steps} timed step(s) after {shape.warmup} warm-up, 1 pair per step, cutoff "
                f"{result.get('cutoff', shape.cutoff)}, attention {result.get('attention', 'auto')}; N = {n / 1e6:,.0f}M "
                f"matmul parameters; {result.get('matmul', 'fp32')} matmul rate {rate / 1e9:,.0f} GFLOP/s (mean of "
                f"{result['matmul_flops_start'] / 1e9:,.0f} before and "
                f"{result.get('matmul_flops_end', rate) / 1e9:,.0f} after)",
                rows, ("contender", "peak allocated GB" if gpu else "peak RSS GB", "peak reserved GB",
                       "allocated at train start GB" if gpu else "RSS at train start GB", "peak - start GB", "step s",
                       "tokens/s", "FLOPs/token", "model GFLOP/s", "of matmul rate"))


def _print_precompute_table(name: str, result: dict, n: int, rate: float) -> None:
    rows, pre = [], result["precompute"]
    bare = pre.get("bare-forward", {"error": "not run"})
    for contender, r in pre.items():
        if "error" in r:
            rows.append((contender, "failed: " + r["error"], "", "", "", "", ""))
            continue
        tps = r["tokens"] / r["seconds"]
        vs = f"{tps / (bare['tokens'] / bare['seconds']):.2f}x" if "error" not in bare else ""
        rows.append((contender, *_memory(r), f"{tps:,.1f}", vs, _util(2 * n * tps, rate)))
    gpu = result.get("matmul") == "bf16"
    print_table(f"{name} precompute (the pass after loading, {pre.get('dpo-lean', {}).get('tokens', 0):,} tokens)",
                rows, ("contender", "peak allocated GB" if gpu else "peak RSS GB", "peak reserved GB", "tokens/s",
                       "tokens/s / bare forward", "model GFLOP/s", "of matmul rate"))


def run_real_shapes(args) -> dict:
    import tempfile

    print(f"real shapes: {', '.join(args.shapes)}; prompt {args.prompt_tokens} + completions "
          f"{args.completion_tokens} tokens each (random ids), cutoff {args.shape_cutoff}, NF4, LoRA r=16 all linear "
          f"layers, attention {args.attn}")
    figures: dict = {}

    def save(name: str, result: dict) -> None:
        figures[name] = result
        if getattr(args, "json", None):
            Path(args.json).write_text(json.dumps(figures, indent=1))

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(args.model_dir) if args.model_dir else Path(tmp)
        for name in args.shapes:
            save(name, run_shape(args, tmp, name, lambda result, name=name: save(name, result)))
    return figures


def add_shape_arguments(parser) -> None:
    group = parser.add_argument_group("real shapes (tools/bench real-shapes, or all --real-shapes)")
    group.add_argument("--real-shapes", action="store_true", help="with `all`: also run the real-shape rows")
    group.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=["Qwen2.5-0.5B", "Qwen2.5-1.5B"])
    group.add_argument("--shape-steps", type=int, default=2, help="timed steps per train contender")
    group.add_argument("--shape-warmup", type=int, default=1, help="warm-up steps before them")
    group.add_argument("--shape-contenders", nargs="*", choices=TRAIN, default=list(TRAIN),
                       help="train contenders to run (none: only the precompute rows)")
    group.add_argument("--shape-precompute", nargs="*", choices=("bare-forward",), default=["bare-forward"],
                       help="precompute rows besides dpo-lean's pass (run after the train contenders)")
    group.add_argument("--shape-cutoff", type=int, default=1024, help="cutoff_len of the real-shape rows")
    group.add_argument("--attn", choices=("sdpa", "fa2", "eager", "auto"), default="auto",
                       help="attention implementation of every contender (dpo-lean's flash_attn key)")
    group.add_argument("--model-dir", default=None,
                       help="keep the built models (and runs) here, reused by a later run, instead of a temp dir")
    group.add_argument("--prompt-tokens", type=int, default=512)
    group.add_argument("--completion-tokens", type=int, default=256)
