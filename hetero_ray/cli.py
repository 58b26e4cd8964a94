"""The ``hetero-ray`` command. Spec fields become flags (``--training-lr 1e-4``), generated from FusionSpec."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import yaml

from hetero_ray.errors import HeteroRayError
from hetero_ray.spec import ClusterSpec, MethodSpec, TrainingSpec

SECTIONS = {"method": MethodSpec, "training": TrainingSpec, "cluster": ClusterSpec}
TOP_LEVEL = {"name": "run name", "seed": "random seed", "output": "fused adapter directory",
             "control": "none | zero_sources | random_sources | replay_only"}


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
    return click.option("--overwrite", is_flag=True, help="replace an existing output directory")(fn)


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
    if kwargs.pop("overwrite", False):
        out["overwrite"] = True
    return out


@click.group()
def cli() -> None:
    """Fuse LoRA experts of different model families into one adapter for a target model (HeteroFusion)."""


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
@click.option("--no-ray", is_flag=True, help="run in this process without Ray or DeepSpeed (reference path)")
@spec_flags
def fuse(spec: Path, address: str | None, no_ray: bool, **kwargs) -> None:
    """Fuse the adapters described by SPEC (a YAML file)."""
    from hetero_ray.progress import RESULT_MARKER, emit
    from hetero_ray.spec import load_spec

    loaded = load_spec(spec, collect_overrides(kwargs))
    if no_ray:
        from hetero_ray.pipeline import fuse_local

        result = fuse_local(loaded, on_step=lambda m: emit({"stage": "train", **m}))
    else:
        from hetero_ray.distributed import fuse as fuse_distributed

        result = fuse_distributed(loaded, address, on_progress=emit)
    emit({"output": str(result.output), "report": str(result.output / "fusion_report.json"),
          "steps": len(result.history)}, RESULT_MARKER)


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the full report as JSON")
@spec_flags
def check(spec: Path, as_json: bool, **kwargs) -> None:
    """Validate SPEC and its inputs; print the plan, sizes and memory per worker, without training."""
    from hetero_ray.check import check as run_check
    from hetero_ray.check import format_check
    from hetero_ray.spec import load_spec

    overrides = collect_overrides(kwargs)
    overrides.setdefault("overwrite", True)  # checking writes nothing; an existing output is no error here
    report = run_check(load_spec(spec, overrides))
    click.echo(json.dumps(report, indent=2) if as_json else format_check(report))


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--family", default=None, help="override the detected family")
@click.option("--base", type=click.Path(path_type=Path), default=None, help="base model dir or config.json")
def inspect(adapter: Path, family: str | None, base: Path | None) -> None:
    """Family, layers, roles, ranks, norms, dtype and hash of a LoRA adapter."""
    from hetero_ray.pipeline import open_adapter

    a, topo = open_adapter(adapter, family, base, allow_pickle=False, strict=False)
    roles = sorted({r for _, r in topo.slots})
    dtypes = sorted({str(a.tensor(m.b_key).dtype) for m in a.modules.values()})
    norms = {p: round(float((a.tensor(m.b_key).float() @ a.tensor(m.a_key).float()).norm()), 6)
             for p, m in a.modules.items()}
    click.echo(json.dumps({
        "path": str(adapter), "family": topo.family.name, "layers": topo.n_layers, "roles": roles,
        "ranks": sorted(topo.ranks()), "modules": len(a.modules), "unmapped": list(topo.unmapped),
        "dtypes": dtypes, "sha256": a.sha256(), "scaling": a.scaling, "product_norms": norms,
    }, indent=2))


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, standalone_mode=False)
    except HeteroRayError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        return 1
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
