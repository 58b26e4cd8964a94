"""The in-process fusion on a GPU (`cluster.use_gpu`) matches the CPU run. Skipped without CUDA (CI has none);
run on a GPU machine with `python -m pytest -q tests/runners/test_gpu.py`."""

import pytest
import torch

from hetero_ray.runners.local import fuse_local
from tests.helpers import make_spec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("control", ["heterofusion", "replay_only"])
def test_gpu_fusion_matches_cpu(zoo, tmp_path, control):
    kw = {"strategy": control, "training.epochs": 1}
    cpu = fuse_local(make_spec(zoo, tmp_path / "cpu", **kw))
    gpu = fuse_local(make_spec(zoo, tmp_path / "gpu", **kw, **{"cluster.use_gpu": True}))
    assert set(cpu.deltas) == set(gpu.deltas)
    scale = max(float(d.abs().max()) for d in cpu.deltas.values())
    for p, d in cpu.deltas.items():
        assert gpu.deltas[p].device.type == "cpu"
        assert float((d - gpu.deltas[p]).abs().max()) <= 5e-3 * scale, p  # float32 sums in another order
    assert [round(h["lm_loss"], 3) for h in cpu.history] == pytest.approx(
        [round(h["lm_loss"], 3) for h in gpu.history], abs=2e-3)


def test_gpu_without_cuda_is_a_clear_error(zoo, tmp_path, monkeypatch):
    from hetero_ray.errors import HeteroRayError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HeteroRayError, match="use_gpu"):
        fuse_local(make_spec(zoo, tmp_path / "x", **{"cluster.use_gpu": True}))
