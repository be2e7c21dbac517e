"""``dpo-lean <command> CONFIG.yaml [key=value ...]``: the commands, and user errors as one-line messages."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from .errors import DpoLeanError, Interrupted


def _quiet_libraries() -> None:
    """Keep the libraries' info chatter (weight loading bars, hub notices) out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on import that an optional hub kernel is missing; dpo-lean never fetches it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def user_errors(fn):
    """Turn a DpoLeanError into ``Error: <one line>`` and exit status 1, with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(str(e), err=True)
            sys.exit(130)
        except DpoLeanError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _config(config_path, overrides):
    from .config import load_config

    return load_config(config_path, overrides)


config_args = [click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False)),
               click.argument("overrides", nargs=-1, metavar="[key=value ...]")]


def with_config(fn):
    for deco in reversed(config_args):
        fn = deco(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpo-lean")
def main():
    """dpo-lean: DPO with the reference run once into a cache, then a 4-bit LoRA policy trained alone.

    Every command takes a LLaMA-Factory-style YAML and optional key=value overrides.
    """
    _quiet_libraries()


@main.command("data-check")
@click.option("--show", type=click.IntRange(min=0), default=0, metavar="N",
              help="Print the first N kept rows as the model sees them: special tokens as \u27e6token\u27e7, "
                   "newlines as \u21b5, a line where each completion starts.")
@click.option("--dump-ids", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Write every kept row's ids as JSON lines {row_index, prompt_ids, chosen_ids, rejected_ids}.")
@with_config
@user_errors
def data_check(config_path, overrides, show=0, dump_ids=None):
    """Load and tokenise exactly as training would; print row counts, skips and token lengths."""
    from .data_check import run_data_check

    run_data_check(_config(config_path, overrides), show=show, dump_ids=dump_ids)


@main.command()
@with_config
@user_errors
def precompute(config_path, overrides):
    """Phase 1: run the frozen reference once; write reference log-probs to the Parquet cache.

    With eval_dataset set, its rows get their own cache too (eval_ref_cache_dir).
    """
    from .precompute import run_precompute

    config = _config(config_path, overrides)
    if not config.needs_reference:
        click.echo(f"pref_loss {config.pref_loss} is reference-free: no reference cache is needed, nothing to "
                   "precompute; run `dpo-lean train CONFIG.yaml`")
        return
    for c in config.cache_configs():
        if c is not config:
            click.echo(f"\neval_dataset {config.eval_dataset} -> {c.resolved_ref_cache_dir}")
        run_precompute(c)


@main.command()
@with_config
@user_errors
def train(config_path, overrides):
    """Phase 2: train the LoRA policy against the cache (no reference model in memory)."""
    from .train import run_train

    try:
        run_train(_config(config_path, overrides))
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """End a distributed launch's process group before the interpreter does: torn down at exit, its threads could
    abort a rank ("terminate called without an active exception") after all the work was done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@main.command()
@with_config
@user_errors
def evaluate(config_path, overrides):
    """Score an adapter (default: the trained one) on cached rows: reward accuracy, margins, log-ratios, loss."""
    from .evaluate import run_evaluate

    run_evaluate(_config(config_path, overrides))


@main.command()
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1, metavar="[key=v1,v2,... ...]")
@user_errors
def sweep(config_path, overrides):
    """Train every combination of the listed values against one reference cache; compare them.

    key=a,b,c sweeps a, b and c. dataset, eval_dataset, lora_target and report_to take commas in their
    value, so key=x,y is one value for them; separate their alternatives with ';' (quoted for the shell):
    'lora_target=q_proj,v_proj;all'. A ';' separates alternatives for any key.
    """
    from .sweep import run_sweep

    run_sweep(config_path, overrides)


@main.command("cache-info")
@click.argument("cache_dir", type=click.Path())
@user_errors
def cache_info(cache_dir):
    """Fingerprint, rows, parts and value statistics of a cache; non-zero exit if incomplete or damaged."""
    from .cache_report import describe

    ok, lines = describe(cache_dir)
    for line in lines:
        click.echo(line)
    if not ok:
        sys.exit(1)


@main.command()
@click.option("--output", "output", default="demo_output", show_default=True, type=click.Path(),
              help="Folder for the tiny model, the data, the cache and the trained adapter.")
@click.option("--epochs", default=None, type=float, help="Override the demo's number of epochs.")
@user_errors
def demo(output, epochs):
    """The whole pipeline on a bundled tiny model and generated data, on CPU, in a few minutes."""
    from .demo import run_demo

    run_demo(output, epochs=epochs)


@main.command()
@with_config
@user_errors
def export(config_path, overrides):
    """Merge the trained adapter into an unquantised copy of the base and save it (export_dir)."""
    from .export import run_export

    run_export(_config(config_path, overrides))


@main.command()
@click.argument("names", nargs=-1, metavar="[KEY ...]")
def keys(names):
    """Every config key (type, default, LLaMA-Factory status, meaning), and what dpo-lean does with each
    LLaMA-Factory key it has no key for; with KEY names, just those keys."""
    from .keys import describe_key, key_table

    click.echo("\n".join(describe_key(n) for n in names) if names else key_table())


if __name__ == "__main__":
    main()
