"""tools/bench: Benchmark dpo-lean against single-model SFT and TRL's DPOTrainer: peak memory, step time, tokens/s.

    python tools/bench train       [--vocab 32000 151936] [--rows 24] [--cutoff 512] [--batch 2]
    python tools/bench precompute  [--vocab 32000 151936] [--rows 24] [--cutoff 512] [--batch 2]
    python tools/bench all         # both tables
    python tools/bench data        [--sizes 1200 12000] [--with-60k] [--source ../shared/data]   (data.py)
    python tools/bench real-shapes [--shapes Qwen2.5-0.5B Qwen2.5-1.5B Qwen2.5-7B] [--shape-steps 2] [--shape-cutoff 1024]
                                   [--attn sdpa|fa2] [--model-dir DIR]   (shapes.py)
    python tools/bench all --real-shapes   # both tables, then the real-shape rows
    python tools/bench sums        [--sums-rows 16] [--sums-trl] [--source ../shared/data]   (sums.py)
    python tools/bench scale-out   [--scaleout-shape Qwen2.5-1.5B]   1 process vs 2 DDP vs 2 FSDP (scaleout.py)
    python tools/bench train --model Qwen/Qwen2.5-0.5B-Instruct   # any hub or local model (on a GPU)

Every contender runs in its own fresh process on the same model, the same rows, batch size, sequence cap,
LoRA settings and quantisation. Default models are built offline: Qwen2 architecture, hidden 256, 4 layers,
NF4 4-bit, with the vocabulary sizes given (the tiny tokenizer's ids are a subset of it). Rows are the first
rows of ../shared/data/dpo_en_demo.json (long multi-turn chats) where present, else generated ones.

train (cache prepared beforehand, not timed):
  dpo-lean          `dpo-lean train` against the cache, two sequences per pair; the same batches as the others
  dpo-lean+shared   the same with prefix sharing on every batch: one [prompt | chosen | rejected] sequence per pair
  dpo-lean+auto     prefix_sharing: auto, the default: the shared layout on the batches where it saves FLOPs
  dpo-lean+groups   `dpo-lean train` with its defaults: prefix_sharing auto and length-grouped batches
  sft               the same model and LoRA, ordinary transformers causal-LM loss on the same chosen and
                    rejected sequences (the single-model SFT yardstick)
  trl               TRL DPOTrainer as QLoRA users run it: PEFT adapter, no ref_model (reference = adapter off)
  trl+precompute    the same with precompute_ref_log_probs=True (precompute not timed)
precompute:
  dpo-lean          `dpo-lean precompute` (the pass, after loading), two sequences per pair
  dpo-lean+shared   the same with prefix sharing on every batch
  dpo-lean+auto     prefix_sharing: auto (the default)
  trl               TRL's precompute_ref_log_probs pass
  bare-forward      a plain no-grad forward (model(input_ids), full logits) over the same batches: the floor
Peak memory: peak RSS of the process on CPU (CUDA peak allocated on a GPU), measured from the start of
training (train) or over the whole process after imports (precompute). Step time: median after warm-up.
Precompute tokens/s: the median of --passes passes, each in a fresh process, contenders taking turns.

Prefix sharing pays where the layers are most of the work and prompts are long; for that shape:
    python tools/bench train --vocab 8192 --hidden 1024 --layers 8 --truncation keep_end --cutoff 1024 \
        --rows 16 --multi-turn --only dpo-lean dpo-lean+shared

The package, one job a module:
    cli.py          the command line: which tables to run, the machine line
    suite.py        `train` / `precompute`: the offline models, the rows, the config every contender mirrors,
                    and their two tables
    contenders.py   each contender (dpo-lean's layouts, SFT, TRL's two modes, the bare forward) and the registry
                    the worker runs them from
    patches.py      the one place that patches libraries: transformers' Trainer (step timer, file-order sampler)
                    and TRL's precompute pass (its timer)
    worker.py       the worker protocol: one fresh process per contender, one RESULT line of JSON back
    tables.py       markdown tables, ratios, the machine line
    data.py         `data`: data-check cold and warm on resampled demo rows, against the tokenizer floor
    shapes.py       `real-shapes`: the train and precompute rows at Qwen2.5-0.5B/1.5B/7B shapes (tools/gpu_check runs
                    the 1.5B and 7B ones on a GPU)
    scale.py        `scale`: precompute then train on 60,000 generated rows, counting tokenisations
    phases.py       `phases`: one train step's RSS phase by phase at a real shape, under both allocator settings
    sums.py         `sums`: each completion's summed log-prob (per-token sums, the cache in both layouts, the tail
                    sums, TRL's precompute) against a float64 forward summed in float64
    scaleout.py     `scale-out`: per-process memory and time of precompute and train at a real shape, as 1 process,
                    2 with DDP and 2 with FSDP; ranked.py is the process each launch runs (its SCALEOUT line)
Memory is measured with dpo_lean/measure.py, the code the run summaries use.
"""
