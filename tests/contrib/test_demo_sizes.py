"""The demo's sizes and how the command line picks one (no models are built here)."""

import pytest
from click.testing import CliRunner

from hetero_ray.cli import cli
from hetero_ray.contrib.demo import DEMO_SIZES, DemoSize


def _cost(size: DemoSize) -> float:
    """Rough compute: parameters per base times pre-training steps, plus the fusion's passes."""
    width = sum(h * h * layers for h, layers in size.widths.values())
    return width * size.pretrain_steps + width * size.epochs * (size.replay_n + 2 * size.teach_n)


def test_sizes_grow_from_quick_to_large_and_unknown_names_are_refused():
    assert list(DEMO_SIZES) == ["quick", "default", "large"]
    assert _cost(DemoSize.of("quick")) < _cost(DemoSize.of("default")) < _cost(DemoSize.of("large"))
    # every size fuses all three families and evaluates on the same tasks
    assert all(set(s.widths) == {"llama", "qwen2", "gemma3"} for s in DEMO_SIZES.values())
    with pytest.raises(ValueError, match="'huge'.*quick, default, large"):
        DemoSize.of("huge")


def test_quick_and_another_size_together_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--quick", "--size", "large", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "two sizes" in res.output
    assert not (tmp_path / "d").exists()  # refused before anything is written
    res = CliRunner().invoke(cli, ["demo", "--size", "huge", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "huge" in res.output
