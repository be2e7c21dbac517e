"""The command line: `python tools/bench {train,precompute,all,data,real-shapes,scale,phases,sums,scale-out} [options]`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import bench
from bench import data, phases, scale, scaleout, shapes, sums, worker
from bench.contenders import LORA
from bench.suite import SHARED_DEMO, TRAIN_CONTENDERS, build_model, run_precompute_bench, run_train_bench, write_rows
from bench.tables import machine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train", "precompute", "all", "data", "real-shapes", "scale", "phases",
                                            "sums", "scale-out"))
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 32000])
    parser.add_argument("--model", help="a hub id or local directory instead of the offline models (use a GPU)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the offline model")
    parser.add_argument("--layers", type=int, default=4, help="layers of the offline model")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--multi-turn", action="store_true", help="only rows whose prompt has a history")
    parser.add_argument("--cutoff", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--truncation", choices=("keep_start", "keep_end"), default="keep_start",
                        help="keep_start is TRL's (needed for the TRL rows); keep_end keeps long prompts")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3, help="precompute passes per contender, each a fresh process (median)")
    parser.add_argument("--only", nargs="+", choices=TRAIN_CONTENDERS, default=list(TRAIN_CONTENDERS),
                        dest="train_contenders", help="train contenders to run (dpo-lean always runs)")
    parser.add_argument("--json", help="also write all figures to this file")
    parser.add_argument("--malloc", choices=("live", "glibc"), default="live",
                        help="live: fix glibc's mmap threshold in every contender, so peak RSS follows live memory "
                             "(default); glibc: its default, under which freed buffers stay resident")
    data.add_data_arguments(parser)
    shapes.add_shape_arguments(parser)
    scale.add_scale_arguments(parser)
    phases.add_phase_arguments(parser)
    sums.add_sums_arguments(parser)
    scaleout.add_scaleout_arguments(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    worker.ALLOCATOR_ENV = dict(worker.LIVE_MEMORY_ENV) if args.malloc == "live" else {}
    if args.command in ("data", "real-shapes", "scale", "phases", "sums", "scale-out"):
        print(f"machine: {machine()}")
        if args.command in ("real-shapes", "scale-out"):
            print(worker.allocator_line())
        run = {"data": data.run_data_bench, "real-shapes": shapes.run_real_shapes, "scale": scale.run_scale,
               "phases": phases.run_phases, "sums": sums.run_sums, "scale-out": scaleout.run_scale_out}[args.command]
        figures = run(args)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return
    if "dpo-lean" not in args.train_contenders:
        args.train_contenders.insert(0, "dpo-lean")
    print(f"machine: {machine()}")
    print(worker.allocator_line())
    print(f"rows: {args.rows} ({'multi-turn ' if args.multi_turn else ''}"
          f"{'dpo_en_demo.json' if SHARED_DEMO.exists() else 'generated'}), "
          f"cap {args.cutoff} tokens ({args.truncation}), batch {args.batch} pairs, NF4 base, "
          f"LoRA r={LORA['r']} on all linear layers" + ("" if args.model else
                                                       f", offline Qwen2 hidden {args.hidden}, {args.layers} layers"))
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = write_rows(tmp / "rows.json", args.rows, args.multi_turn)
        models = ([(args.model, args.model)] if args.model else
                  [(f"vocab {v:,}", build_model(tmp / f"model-{v}", v, args.hidden, args.layers)) for v in args.vocab])
        for label, model in models:
            if args.command in ("train", "all"):
                figures[f"train {label}"] = run_train_bench(args, tmp, model, rows, label)
            if args.command in ("precompute", "all"):
                figures[f"precompute {label}"] = run_precompute_bench(args, tmp, model, rows, label)
    if args.command == "all" and args.real_shapes:
        figures["real shapes"] = shapes.run_real_shapes(args)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
