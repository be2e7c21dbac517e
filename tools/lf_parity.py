"""Parity fixtures from LLaMA-Factory itself: LF 0.9.5's token ids for every template, on awkward rows.

    python tools/lf_parity.py setup VENV       # a separate venv with llamafactory==0.9.5 (never committed)
    VENV/bin/python tools/lf_parity.py build   # run LF's own pipeline, write tests/fixtures/lf_parity/

``build`` writes the rows (data/), a test tokenizer (the tiny model's, plus the template strings' special
tokens and a BOS token, no pad token; tokenizer/) and ``lf_ids.json.gz``: for every template name LF
registers, the ids that LF's ``get_template_and_fix_tokenizer`` + ``get_dataset(stage="rm")`` give for
every row (prompt, chosen, rejected), the lengths LF keeps at a short cutoff_len, the lengths dpo-lean's
keep_end/keep_start rules keep (computed here from LF's ids), and the tokenizer as LF left it. Templates
LF ties to an image/audio processor run with a stand-in processor (:func:`stand_in_processor`), and their
ids must equal those of the same template with LF's plain-text plugin; one that still fails is recorded
with LF's error.
It also parses every file in configs/ with LF's own argument parser and records which ones LF accepts.
tests/test_lf_parity.py compares dpo-lean with all of it, and checks that the fixture was made from the
committed rows, tokenizer, configs and template list (LF cannot be imported there).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "lf_parity"
TINY = ROOT / "tests" / "fixtures" / "tiny-model"
LF_VERSION = "0.9.5"
FULL, SHORT = 100_000, 48  # cutoff_len: nothing truncated; most rows truncated (all three infer_seqlen cases)
DATASETS = "lf_alpaca,lf_sharegpt"
BOS = "<s>"

LONG = ("The quick brown fox jumps over the lazy dog. A user asks a question and the assistant answers it. "
        "Explain how a computer works, step by step, in simple words. ")
THOUGHT = "<think>\nThe user wants the capital.\n</think>\n\n"
ALPACA = [  # instruction, input, chosen, rejected, system, history
    ("What is the capital of France?", "", "Paris is the capital of France.", "I think it is Rome.", None, None),
    ("Translate to French.", "Good morning", "Bonjour", "Bonsoir", None, None),
    ("Say hi.", "", "Hi!", "Go away.", "You are a careful assistant.", None),
    ("And Spain?", "", "Madrid.", "Lisbon.", None, [["Capital of France?", "Paris."], ["And Italy?", "Rome."]]),
    ("Écris «bonjour» 👋 в 日本語: こんにちは", "", "こんにちは 👋 — «bonjour»", "नमस्ते 🙏 שלום", None, None),
    ("Combining: e\u0301 and Å; zero width\u200bjoin", "tab\there\r\nCRLF", "e\u0301 ok", "e ok", None, None),
    ("Answer with spaces.", "", "\n\n  Spaced answer.  \n", "  Spaced answer.", None, None),
    ("Literal tokens <|im_end|> and {{content}} and {{idx}} here.", "", "Seen <|im_start|> it.", "Not seen.", None, None),
    (LONG * 3, "", "Short answer.", "Another short answer.", None, None),
    ("Write a long story.", "", LONG * 3, "No.", None, None),
    (LONG * 2, "Context: " + LONG, LONG * 2, LONG + "The end.", "Be thorough.", None),
    ("Capital of France?", "", THOUGHT + "Paris.", "Rome.", None, None),
    ("Capital of Spain?", "", "Madrid.", THOUGHT + "Lisbon.", None, [["Capital of France?", THOUGHT + "Paris."]]),
    ("Capital?", "", "Paris.\n</think>\nDone.", "Rome.", None, None),
    ("Print hello in Python.", "", "```python\ndef main():\n    print('hello, world')\n```", "print hello", None, None),
    ("Count to five.", "", "1 2 3 4 5", "1 2 3 4 6", "System with\nnewlines\n\nand more.", [["Count to two.", "1 2"]]),
    ("Hi", "", "Hello!", "Hello.", "", None),
    ("Summarise.", LONG * 2, "A fox and a dog.", "A computer.", None, [[LONG, "Noted."]]),
]
SHAREGPT = [  # conversation turns as (from, value), chosen, rejected, system column
    ([("system", "You are terse."), ("human", "Name a colour.")], "Blue.", "I like many colours.", None),
    ([("human", "Hi"), ("gpt", "Hello! How can I help?"), ("human", "Tell a joke."), ("gpt", "Why did the fox jump?"),
      ("human", "Why?")], "To get over the lazy dog.", "I do not know.", None),
    ([("human", "日本の首都は？")], "東京です。", "大阪です。", "日本語で答えてください。"),
    ([("human", LONG * 2), ("gpt", LONG), ("human", "Again, shorter.")], "A fox; a computer.", LONG * 2, None),
    ([("human", "Think first: 2+2?"), ("gpt", THOUGHT + "4"), ("human", "And 3+3?")], THOUGHT + "6", "7", None),
    ([("human", "Emoji only 😀😀")], "😀", "😢", "System from the column."),
    ([("system", "Multi\nline\nsystem."), ("human", "Ok?")], "Ok.", "No.", None),
]


def alpaca_rows() -> list[dict]:
    rows = []
    for instruction, query, chosen, rejected, system, history in ALPACA:
        row = {"instruction": instruction, "input": query, "chosen": chosen, "rejected": rejected}
        if system is not None:
            row["system"] = system
        if history is not None:
            row["history"] = history
        rows.append(row)
    return rows


def sharegpt_rows() -> list[dict]:
    rows = []
    for turns, chosen, rejected, system in SHAREGPT:
        row = {"conversations": [{"from": f, "value": v} for f, v in turns],
               "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}
        if system is not None:
            row["system"] = system
        rows.append(row)
    return rows


def dataset_info() -> dict:
    alpaca = {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
              "system": "system", "history": "history"}
    sharegpt = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "system"}
    return {"lf_alpaca": {"file_name": "alpaca.json", "ranking": True, "columns": alpaca},
            "lf_sharegpt": {"file_name": "sharegpt.json", "ranking": True, "formatting": "sharegpt", "columns": sharegpt}}


def write_rows(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in (("alpaca.json", alpaca_rows()), ("sharegpt.json", sharegpt_rows()),
                       ("dataset_info.json", dataset_info())):
        (directory / name).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def digest(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# --- LF side ------------------------------------------------------------------------------------------

def template_tokens(templates) -> list[str]:
    """Special-looking pieces of every LF template string (<|im_start|>, [INST], <｜User｜>, ...)."""
    found = set()
    for t in templates.values():
        for formatter in (t.format_user, t.format_assistant, t.format_system, t.format_observation, t.format_prefix):
            for slot in formatter.slots:
                if isinstance(slot, str):
                    found.update(re.findall(r"<[^<>\s{}]+>|\[[^\[\]\s{}]+\]", slot))
                elif isinstance(slot, dict):
                    found.add(slot["token"])
        found.update(w.strip() for w in t.thought_words if w.strip())
    return sorted(found)


def build_tokenizer(templates, directory: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY)
    tok.add_special_tokens({"bos_token": BOS, "additional_special_tokens": template_tokens(templates)})
    tok.pad_token = None
    tok.chat_template = None
    shutil.rmtree(directory, ignore_errors=True)
    tok.save_pretrained(directory)


class Unused:
    """Any attribute, call or arithmetic gives itself, and it is false: the model-specific processor values
    (merge_size, boi_token, ...) that LF's multimodal plugins read up front but use only to expand an image,
    video or audio placeholder, which a text row does not have."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __bool__(self):
        return False

    __pow__ = __mul__ = __rmul__ = __add__ = __radd__ = __sub__ = __truediv__ = __floordiv__ = __call__


def stand_in_processor(tokenizer, model_args):
    """A processor for LF's multimodal templates on text rows: LF's own processor settings (patch_processor),
    the processor objects LF checks exist, and :class:`Unused` for everything model-specific."""
    from llamafactory.model.patcher import patch_processor

    processor = Unused()
    for name in ("image_processor", "video_processor", "feature_extractor", "audio_processor"):
        object.__setattr__(processor, name, Unused())
    # Values some plugins need as real str/int/list even for text (their models' own processor settings):
    # gemma3 replaces "{{image}}" in every message, kimi_vl and paligemma size their image token runs.
    processor.boi_token = "<start_of_image>"
    processor.full_image_sequence = "\n\n<start_of_image>" + "<image_soft_token>" * 256 + "<end_of_image>\n\n"
    processor.image_seq_length = 256
    processor.image_processor.merge_kernel_size = [2, 2]
    patch_processor(processor, tokenizer, model_args)
    return processor


def lf_pairs(name: str, cutoff: int, data_dir: Path, tok_dir: Path, multimodal: bool, **data_args) -> tuple[dict, list]:
    """LF's tokenizer state and (prompt, chosen, rejected) ids for every row, from LF's own pipeline."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import get_train_args
    from transformers import AutoTokenizer

    saved_system = TEMPLATES[name].default_system  # LF overwrites it in place with data_args.default_system
    with tempfile.TemporaryDirectory() as out:
        args = dict(stage="dpo", do_train=True, finetuning_type="lora", model_name_or_path=str(tok_dir),
                    dataset=DATASETS, dataset_dir=str(data_dir), template=name, cutoff_len=cutoff, output_dir=out,
                    overwrite_cache=True, report_to="none", **data_args)
        model_args, d_args, train_args, _, _ = get_train_args(args)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        processor = stand_in_processor(tokenizer, model_args) if multimodal else None
        try:
            template = get_template_and_fix_tokenizer(tokenizer, d_args)
            with contextlib.redirect_stdout(io.StringIO()):
                ds = get_dataset(template, model_args, d_args, train_args, stage="rm", tokenizer=tokenizer,
                                 processor=processor)["train_dataset"]
        finally:
            TEMPLATES[name].default_system = saved_system
    state = {"eos": tokenizer.eos_token, "eos_id": tokenizer.eos_token_id, "pad": tokenizer.pad_token,
             "pad_id": tokenizer.pad_token_id, "bos_id": tokenizer.bos_token_id, "vocab": len(tokenizer),
             "added": {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}}
    pairs = []
    for ex in ds:
        n = sum(1 for x in ex["chosen_labels"] if x == -100)
        assert n == sum(1 for x in ex["rejected_labels"] if x == -100)
        assert ex["chosen_input_ids"][:n] == ex["rejected_input_ids"][:n]
        pairs.append((ex["chosen_input_ids"][:n], ex["chosen_input_ids"][n:], ex["rejected_input_ids"][n:]))
    return state, pairs


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LF 0.9.5 processor_utils.infer_seqlen, restated to check LF's output is prefix slices."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    target = min(max_target, target_len)
    return min(max(cutoff_len - target, 0), source_len), target


def dpo_lean_cuts(p: int, c: int, r: int, cutoff: int) -> dict:
    """Lengths dpo-lean's rules (docs/data.md, Truncation) keep: keep_end [prompt tokens kept from its end, completion tokens];
    keep_start [completion tokens] or None where the prompt alone fills cutoff_len (the row is skipped)."""
    longest = max(c, r)
    if p + longest <= cutoff:
        return {"keep_end": [p, longest], "keep_start": [longest]}
    keep = min(p, max(cutoff - longest, cutoff // 2))
    return {"keep_end": [keep, cutoff - keep], "keep_start": None if p >= cutoff else [cutoff - p]}


def template_case(name: str, data_dir: Path, tok_dir: Path, multimodal: bool, **data_args) -> dict:
    state, full = lf_pairs(name, FULL, data_dir, tok_dir, multimodal, **data_args)
    _, short = lf_pairs(name, SHORT, data_dir, tok_dir, multimodal, **data_args)
    lf_cut, ours = [], {"keep_end": [], "keep_start": []}
    for (p, c, r), (sp, sc, sr) in zip(full, short, strict=True):
        s, t = infer_seqlen(len(p), max(len(c), len(r)), SHORT)
        assert (sp, sc, sr) == (p[:s], c[:t], r[:t]), name  # LF keeps the starts: lengths say it all
        lf_cut.append([s, t])
        for mode, kept in dpo_lean_cuts(len(p), len(c), len(r), SHORT).items():
            ours[mode].append(kept)
    return {"tokenizer": state, "rows": full, "cut": {"llamafactory": lf_cut, **ours}}


def lf_keys() -> list[str]:
    """Every key LF's train argument parser knows."""
    import dataclasses

    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from llamafactory.hparams.training_args import TrainingArguments

    classes = (ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments)
    return sorted({f.name for c in classes for f in dataclasses.fields(c)})


def dpo_lean_configs() -> list[Path]:
    """The dpo-lean configs in configs/ (accelerate_*.yaml are accelerate launch's config files)."""
    return sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("accelerate_"))


def lf_config_check(path: Path) -> str:
    """"ok" if LF's own argument parser accepts the file, else its first error line."""
    import yaml
    from llamafactory.hparams import get_train_args

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as out:
        raw["output_dir"] = out  # LF checks its output_dir; where it is does not matter here
        raw["use_cpu"] = True  # transformers refuses bf16 on a machine without a GPU unless told it is a CPU run
        try:
            get_train_args(raw)
        except (ValueError, SystemExit, OSError, ImportError) as e:
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return "ok"


def text_plugin_rows(name: str, template, data_dir: Path, tok_dir: Path) -> list:
    from llamafactory.data.mm_plugin import get_mm_plugin

    plugin, template.mm_plugin = template.mm_plugin, get_mm_plugin(name="base")
    try:
        return lf_pairs(name, FULL, data_dir, tok_dir, False)[1]
    finally:
        template.mm_plugin = plugin


def variants(name: str, template) -> dict[str, dict]:
    """Extra cases: thinking switched off / kept in the history (reasoning templates); another default system."""
    from llamafactory.data.template import ReasoningTemplate

    out = {}
    if isinstance(template, ReasoningTemplate):
        out |= {"enable_thinking=false": {"enable_thinking": False}, "preserve_thinking=true": {"preserve_thinking": True}}
    if name in ("qwen", "llama2", "gemma", "empty"):
        out["default_system=Be terse."] = {"default_system": "Be terse."}
    return out


def build() -> None:
    import llamafactory
    from llamafactory.data.template import TEMPLATES

    assert llamafactory.__version__ == LF_VERSION, llamafactory.__version__
    data_dir, tok_dir = OUT / "data", OUT / "tokenizer"
    write_rows(data_dir)
    build_tokenizer(TEMPLATES, tok_dir)
    cases, refused = {}, {}
    for name, template in TEMPLATES.items():
        multimodal = any(tok is not None for tok in (template.mm_plugin.image_token, template.mm_plugin.video_token,
                                                      template.mm_plugin.audio_token))
        try:
            cases[name] = template_case(name, data_dir, tok_dir, multimodal)
        except Exception as e:  # LF's own refusal: recorded, and dpo-lean must refuse the name too
            refused[name] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            continue
        if multimodal:  # the plugin leaves text rows alone: the same ids as with LF's plain-text plugin
            assert cases[name]["rows"] == text_plugin_rows(name, template, data_dir, tok_dir), name
        for label, args in variants(name, template).items():  # LF's data arguments that change ids
            cases[f"{name} {label}"] = template_case(name, data_dir, tok_dir, multimodal, **args)
        print(f"{name}: ok", file=sys.stderr)
    configs = {p.name: {"sha256": digest([p]), "lf": lf_config_check(p)} for p in dpo_lean_configs()}
    fixture = {"lf_version": LF_VERSION, "datasets": DATASETS, "cutoff_len": {"full": FULL, "short": SHORT},
               "lf_keys": lf_keys(),
               "rows_sha256": digest(data_dir.iterdir()), "tokenizer_sha256": digest(tok_dir.iterdir()),
               "lf_templates": sorted(TEMPLATES), "refused": refused, "cases": cases, "configs": configs}
    text = json.dumps(fixture, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    (OUT / "lf_ids.json.gz").write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))  # same bytes
    print(f"{len(cases)} cases, refused: {', '.join(refused) or 'none'}", file=sys.stderr)


# --- the venv -------------------------------------------------------------------------------------------

def setup(venv: Path) -> None:
    """llamafactory==0.9.5 next to CPU torch 2.13, importable without a GPU."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    constraints = venv / "constraints.txt"
    constraints.write_text("torch==2.13.0\n")  # else LF's requirements pull a multi-GB CUDA build
    subprocess.run([*pip, "-c", str(constraints), "torch==2.13.0"], check=True)
    subprocess.run([*pip, "-c", str(constraints), f"llamafactory=={LF_VERSION}"], check=True)
    # The PyPI torchvision build is linked against CUDA and breaks `import transformers`; LF's text path needs none.
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=True)
    # torchaudio's C++ extension needs CUDA libraries too; without its .so files it imports in pure Python.
    site = next((venv / "lib").glob("python3*/site-packages"))
    aside = venv / "torchaudio_lib_aside"
    aside.mkdir(exist_ok=True)
    for so in (site / "torchaudio" / "lib").glob("*.so"):
        so.rename(aside / so.name)
    subprocess.run([str(venv / "bin" / "python"), "-c", "import torchaudio, llamafactory.data"], check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["setup"] and len(sys.argv) == 3:
        setup(Path(sys.argv[2]))
    elif sys.argv[1:] == ["build"]:
        build()
    else:
        sys.exit(__doc__)
