"""List every key LLaMA-Factory 0.9.5's `llamafactory-cli train` accepts, and every key of its DPO and QLoRA examples.

    python tools/lf_keys.py [LF_REPO]      # default: /work/.mirror/hiyouga+LLaMA-Factory/repo (a git clone)

Writes tests/fixtures/lf_keys.json: {"examples": {path: {key: value}}, "arguments": {key: LF's default}}.
The argument classes are those LF's train parser takes (ModelArguments, DataArguments, TrainingArguments,
FinetuningArguments, GeneratingArguments, with all their mixins), read from LF's source with ``ast``; LF's
TrainingArguments extends transformers' Seq2SeqTrainingArguments, whose fields come from the installed
transformers. tests/test_lf_keys.py walks the file: each key must be honoured, refused with a reason, or
documented as having no effect (dpo_lean/lf_keys.py).
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "lf_keys.json"
TAG = "v0.9.5"
HPARAMS = ("model_args", "data_args", "training_args", "finetuning_args", "generating_args")
EXAMPLES = ("examples/train_lora/qwen3_lora_dpo.yaml", "examples/train_lora/qwen3vl_lora_dpo.yaml",
            "examples/train_qlora/", "examples/extras/fsdp_qlora/", "examples/merge_lora/",
            "examples/v1/train_qlora/")
# LF's enum defaults, by their source text (extras/constants.py)
ENUM_VALUES = {"AttentionFunction.AUTO": "auto", "EngineName.HF": "huggingface", "QuantizationMethod.BNB": "bnb"}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _default(node: ast.expr | None, source: str):
    if node is None:
        return None
    text = ast.get_source_segment(source, node)
    if text in ENUM_VALUES:
        return ENUM_VALUES[text]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):  # 768 * 768
        return _default(node.left, source) * _default(node.right, source)
    return ast.literal_eval(node)


def source_fields(source: str) -> dict[str, object]:
    """name -> default of every ``name: T = field(default=...)`` in the dataclasses of ``source``."""
    out = {}
    for cls in (n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)):
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            call = stmt.value
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "field"):
                continue
            kw = {k.arg: k.value for k in call.keywords}
            if isinstance(kw.get("init"), ast.Constant) and kw["init"].value is False:
                continue  # derived by LF, "Do not specify it"
            out.setdefault(stmt.target.id, _default(kw.get("default"), source))
    return out


def transformers_fields() -> dict[str, object]:
    from transformers import Seq2SeqTrainingArguments

    out = {}
    for f in dataclasses.fields(Seq2SeqTrainingArguments):
        if not f.init:
            continue
        value = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = value.value if isinstance(value, enum.Enum) else value
    return out


def example_keys(repo: Path) -> dict[str, dict]:
    files = _git(repo, "ls-tree", "-r", "--name-only", TAG, *EXAMPLES).split()
    return {f: yaml.safe_load(_git(repo, "show", f"{TAG}:{f}")) for f in sorted(files) if f.endswith(".yaml")}


def main(argv: list[str]) -> int:
    repo = Path(argv[0] if argv else "/work/.mirror/hiyouga+LLaMA-Factory/repo")
    arguments = transformers_fields()
    for name in HPARAMS:
        arguments.update(source_fields(_git(repo, "show", f"{TAG}:src/llamafactory/hparams/{name}.py")))
    import transformers

    data = {"llamafactory": TAG, "transformers": transformers.__version__, "examples": example_keys(repo),
            "arguments": dict(sorted(arguments.items()))}
    OUT.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(data['arguments'])} argument keys, {len(data['examples'])} example files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
