"""``dpo-lean <command> CONFIG.yaml [key=value ...]``: the commands, and user errors as one-line messages."""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading

import click

from .errors import DpoLeanError, Interrupted, Stopped


def _quiet_libraries() -> None:
    """Keep the libraries' info chatter (weight loading bars, hub notices) out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns on import that an optional hub kernel is missing; dpo-lean never fetches it.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)  # its offline notice about that same hub kernel
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def user_errors(fn):
    """Turn a DpoLeanError into ``Error: <one line>`` and exit status 1, with no traceback; a run stopped by a signal
    exits 128 + its number (130 for Ctrl-C, 143 for SIGTERM), as a shell reports a process the signal killed."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = _stop_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(str(e), err=True)
            sys.exit(128 + e.signum)
        except DpoLeanError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)
            click.echo("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}",
                       err=True)
            sys.exit(128 + signum)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _stop_on_sigterm():
    """SIGTERM raises Stopped, as Ctrl-C raises KeyboardInterrupt: a scheduler's stop gets a message, the exit
    status 143 and the cleanup a Ctrl-C gets (train and precompute save their work first: faults.GracefulStop).
    The previous handler, or None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise Stopped(signum)

    return signal.signal(signal.SIGTERM, stop)


def _config(config_path, overrides):
    from .config import load_config

    return load_config(config_path, overrides)


config_args = [click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False)),
               click.argument("overrides", nargs=-1, metavar="[key=value ...]")]


def with_config(fn):
    for deco in reversed(config_args):
        fn = deco(fn)
    return fn


WORKFLOW = ("data-check", "precompute", "train", "evaluate", "export", "sweep", "cache-info", "config", "keys", "demo")


class Workflow(click.Group):
    """`--help` lists the commands in the order a run uses them, not alphabetically."""

    def list_commands(self, ctx):
        return sorted(self.commands, key=lambda n: WORKFLOW.index(n) if n in WORKFLOW else len(WORKFLOW))


@click.group(cls=Workflow, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dpo-lean")
def main():
    """dpo-lean: DPO with the reference run once into a cache, then a 4-bit LoRA policy trained alone.

    Every command takes a LLaMA-Factory-style YAML and optional key=value overrides.
    """
    _quiet_libraries()


@main.command("data-check", short_help="Tokenise the data as training will: rows, skips, lengths.")
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


@main.command(short_help="Phase 1: run the reference once into the reference cache.")
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


@main.command(short_help="Phase 2: train the LoRA policy against the reference cache.")
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


@main.command(short_help="Score an adapter: reward accuracy, margins, log-ratios, loss.")
@with_config
@user_errors
def evaluate(config_path, overrides):
    """Score an adapter (default: the trained one) on cached rows: reward accuracy, margins, log-ratios, loss."""
    from .evaluate import run_evaluate

    run_evaluate(_config(config_path, overrides))


@main.command(short_help="Train every combination of values on one cache; compare.")
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


@main.command("cache-info", short_help="A reference cache: fingerprint, rows, values, completeness.")
@click.argument("path", metavar="CACHE_DIR|CONFIG.yaml", type=click.Path())
@click.argument("overrides", nargs=-1, metavar="[key=value ...]")
@user_errors
def cache_info(path, overrides):
    """Fingerprint, rows, parts and value statistics of a cache; non-zero exit if incomplete or damaged.

    PATH is the cache folder, or a config (with key=value overrides) whose reference cache (ref_cache_dir, and
    eval_ref_cache_dir with eval_dataset) is described.
    """
    from pathlib import Path

    from .cache_report import describe

    if Path(path).is_file():
        config = _config(path, overrides)
        if not config.needs_reference:
            click.echo(f"pref_loss {config.pref_loss} is reference-free: it reads no reference cache")
            return
        folders = [c.resolved_ref_cache_dir for c in config.cache_configs()]
    elif overrides:
        raise DpoLeanError(f"cache-info {path}: key=value overrides go with a CONFIG.yaml, not a cache folder")
    else:
        folders = [path]
    sound = True
    for n, folder in enumerate(folders):
        ok, lines = describe(folder)
        click.echo("\n".join(([""] if n else []) + lines))
        sound = sound and ok
    if not sound:
        sys.exit(1)


@main.command(short_help="Try it: the whole pipeline on a tiny bundled model, on CPU.")
@click.option("--output", "output", default="demo_output", show_default=True, type=click.Path(),
              help="Folder for the tiny model, the data, the cache and the trained adapter.")
@click.option("--epochs", default=None, type=float, help="Override the demo's number of epochs.")
@user_errors
def demo(output, epochs):
    """The whole pipeline on a bundled tiny model and generated data, on CPU, with no network: data-check,
    precompute (2,000 rows), then 675 training steps; it prints the held-out reward accuracy before and after
    training (about 0.5, then 1.0). About a minute on 2 CPU cores."""
    from .demo import run_demo

    run_demo(output, epochs=epochs)


@main.command(short_help="Merge the trained adapter into the base model; save it.")
@with_config
@user_errors
def export(config_path, overrides):
    """Merge the trained adapter into an unquantised copy of the base and save it (export_dir)."""
    from .export import run_export

    run_export(_config(config_path, overrides))


@main.command("config", short_help="See a run before it runs: keys, files, what is ready.")
@with_config
@user_errors
def config_command(config_path, overrides):
    """Print the resolved config (every key, its value, and where it came from: default, YAML or override), what
    the run reads and writes, whether the prepared data and the reference cache already match, and where train
    would start. From fingerprints and manifests: nothing is tokenised and no model is loaded."""
    from .config_report import report

    click.echo("\n".join(report(config_path, overrides)))


@main.command(short_help="Config keys: type, default, LLaMA-Factory status, meaning.")
@click.argument("names", nargs=-1, metavar="[KEY ...]")
def keys(names):
    """Every config key (type, default, LLaMA-Factory status, meaning), and what dpo-lean does with each
    LLaMA-Factory key it has no key for; with KEY names, just those keys (an unknown one with the nearest key)."""
    from .keys import describe_key, key_table

    click.echo("\n".join(describe_key(n) for n in names) if names else key_table())


if __name__ == "__main__":
    main()
