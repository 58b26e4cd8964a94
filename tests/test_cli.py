import json

import yaml

from hetero_ray.cli import main
from hetero_ray.progress import RESULT_MARKER, parse


def _spec_file(zoo, tmp_path, **extra):
    data = {
        "output": "fused",
        "target": {"base": str(zoo["llama-base"]), "adapter": str(zoo["llama-lora"])},
        "sources": [{"adapter": str(zoo["qwen2-lora"])}, {"adapter": str(zoo["phi3-lora"])}],
        "replay": [{"path": str(zoo["replay"]), "take": 8}],
        "method": {"num_projections": 32},
        "training": {"epochs": 1, "grad_accum": 2, "max_length": 64},
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_spec_fails_before_ray_starts_naming_the_field(zoo, tmp_path, capsys):
    import ray

    path = _spec_file(zoo, tmp_path, cluster={"workers": 0, "zero_stagee": 3})
    assert main(["fuse", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cluster.workers" in err and "cluster.zero_stagee" in err and str(path) in err
    assert not ray.is_initialized()
    assert main(["fuse", str(_spec_file(zoo, tmp_path)), "--training-lr", "fast"]) == 2
    assert "training.lr" in capsys.readouterr().err
    assert not (tmp_path / "fused").exists()


def test_fuse_without_ray_with_flag_overrides(zoo, tmp_path, capsys):
    path = _spec_file(zoo, tmp_path)
    out = tmp_path / "elsewhere"
    assert main(["fuse", str(path), "--no-ray", "--training-max-steps", "2", "--output", str(out),
                 "--method-alignment", "uniform"]) == 0
    (result,) = parse(capsys.readouterr().out, RESULT_MARKER)
    assert result["output"] == str(out) and result["steps"] == 2
    report = json.loads((out / "fusion_report.json").read_text())
    assert report["spec"]["method"]["alignment"] == "uniform"
    assert report["spec"]["training"]["max_steps"] == 2
    # Phi-3's fused qkv_proj / gate_up_proj fed the Llama target's q, k, v, gate and up
    feeds = {(e["role"], f["source_id"]) for e in report["alignment"]["entries"] for f in e["feeds"]}
    assert {("q", "phi3-lora"), ("v", "phi3-lora"), ("up", "phi3-lora")} <= feeds


def test_inspect(zoo, capsys):
    assert main(["inspect", str(zoo["phi3-lora"])]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "phi3" and info["layers"] == 3 and info["ranks"] == [4]
    assert info["roles"] == ["down", "gate", "k", "o", "q", "up", "v"]
    assert len(info["sha256"]) == 64
