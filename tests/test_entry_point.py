"""One entry point: every registered strategy, run from Python (hetero_ray.run) and from the CLI, takes the
same path and writes the same adapter with the same report schema."""

import json

import pytest
import torch
from safetensors.torch import load_file

import hetero_ray
from hetero_ray.cli import main
from hetero_ray.contrib import tiny
from hetero_ray.io.adapters import WEIGHTS_NAME
from hetero_ray.io.export import REPORT_KEYS
from hetero_ray.strategies import STRATEGIES
from tests.helpers import Workspace


@pytest.fixture(scope="module")
def llama_expert(zoo, tmp_path_factory):
    """An expert on the target's own base, for the same-family merges."""
    return tiny.build_lora_adapter(zoo["llama-base"], tmp_path_factory.mktemp("same") / "other", "llama", rank=4,
                                   seed=11)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_python_and_cli_run_the_same_strategy_and_write_the_same_adapter(name, zoo, llama_expert, tmp_path,
                                                                         capsys):
    """Regression: hetero_ray.fuse(spec) used to ignore spec.strategy and run plain HeteroFusion."""
    ws = Workspace(tmp_path, zoo)
    strategy = STRATEGIES[name]
    ws.spec["sources"] = [{"adapter": str(llama_expert)}] if strategy.same_family else ws.spec["sources"][:1]
    ws.spec.update(strategy=name, output="py")
    control = getattr(strategy, "control", None)
    if control is not None and control.uses_teacher and not control.reads_sources:  # only the answers teach them
        ws.spec.update(teach={"prompts": [{"path": "replay.jsonl", "take": 2}], "max_new_tokens": 4},
                       objective={"paper": 1.0, "distill": 1.0})
    if name == "added_rank_only":
        ws.spec["method"] = {**ws.spec.get("method", {}), "extra_rank": 2}
    spec = ws.write_spec()
    result = hetero_ray.run(spec, use_ray=False)
    assert main(["fuse", spec, "--no-ray", "--output", str(tmp_path / "cli")]) == 0, capsys.readouterr().err
    reports = [json.loads((d / "fusion_report.json").read_text()) for d in (result.adapter, tmp_path / "cli")]
    for report in reports:
        assert set(REPORT_KEYS) <= set(report)
        assert report["strategy"] == report["spec"]["strategy"] == name
        assert report["kind"] == strategy.kind
        assert report["inputs"]["target_adapter"] and len(report["inputs"]["sources"]) == 1
        assert (report["history"] != []) == (strategy.kind == "trained")
    a = load_file(str(result.adapter / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "cli" / WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_python_m_hetero_ray_is_the_cli():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hetero_ray", "strategies"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and all(name in proc.stdout for name in STRATEGIES)
