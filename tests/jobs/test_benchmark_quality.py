"""jobs/benchmark_quality.py end to end on tiny local models (its real models are benchmark-only)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hetero_ray.contrib import tiny

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["target_only", "heterofusion", "distill_only", "added_rank_only", "zero_sources", "wrong_task_expert",
           "distill_wrong_task"]


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    tok = tiny.build_tokenizer(texts=tiny.task_corpus())
    target = tiny.build_tiny_model("llama", root / "llama", seed=0, tokenizer=tok)
    source = tiny.build_tiny_model("gemma3", root / "gemma3", seed=1, tokenizer=tok)
    data = root / "uie"
    data.mkdir()
    for name, task in (("mit-movie", "movie"), ("mit-restaurant", "restaurant"), ("vehicles", "vehicle")):
        (data / f"{name}_sample300.json").write_text(json.dumps(tiny.task_records(task, 110, seed=3)))
    return root, target, source, data


def _job(bench_inputs, out, *extra, cache=None):
    """The job on the tiny inputs (experts cached in the fixture's folder unless ``cache``), its process."""
    root, target, source, data = bench_inputs
    cmd = [sys.executable, "jobs/benchmark_quality.py", "--data", str(data), "--out", str(out), "--size", "smoke",
           "--target", str(target), "--source", str(source), "--device", "cpu", "--wrong-task", "vehicles",
           "--methods", *METHODS, *extra]
    env = {**os.environ, "HETERO_RAY_CACHE": str(cache or root / "cache")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _run(bench_inputs, out, *extra):
    proc = _job(bench_inputs, out, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.timeout(1200)
def test_benchmark_job_runs_the_protocol_and_resumes(bench_inputs, tmp_path):
    out = tmp_path / "run"
    log = _run(bench_inputs, out, "--lr-of", "zero_sources=3e-3")
    result = json.loads((out / "results.json").read_text())
    assert set(result["scores"]) == set(METHODS)
    for method, per_task in result["scores"].items():
        assert set(per_task) == {"mit-movie", "mit-restaurant"}
        n = 1 if method == "target_only" else 2
        assert all(len(v) == n and all(0 <= x <= 1 for x in v) for v in per_task.values()), (method, per_task)
    # no label of the source task in training: the replay is the target task, the prompts carry no output
    spec = (out / "specs" / "heterofusion-0.yaml").read_text()
    assert "mit-movie-replay" in spec and "mit-restaurant-prompts" in spec and "mit-restaurant-replay" not in spec
    prompts = [json.loads(line) for line in (out / "data" / "mit-restaurant-prompts.jsonl").read_text().splitlines()]
    assert prompts and all("output" not in r for r in prompts)
    # the verdict is computed: paired CIs against the control, gap recovered, target kept
    v = result["verdicts"]["heterofusion"]
    assert set(v["vs_controls"]) == {"zero_sources", "wrong_task_expert", "distill_wrong_task"}
    assert v["vs_controls"]["zero_sources"]["lo"] <= v["vs_controls"]["zero_sources"]["diff"] <= \
        v["vs_controls"]["zero_sources"]["hi"]
    assert "Verdict:" in log and "Transfer nets vs distill_only" in (out / "results.md").read_text()
    own = v["vs_target_only"]  # and against the target's own expert, on both tasks
    assert set(own) == {"mit-movie", "mit-restaurant"} and all(x["lo"] <= x["diff"] <= x["hi"] for x in own.values())
    assert "vs target_only: mit-movie" in (out / "results.md").read_text()
    assert set(result["reference"]) == {"mit-restaurant"}
    # target_only is the target's own expert, unchanged (not the bare base)
    assert Path(result["adapters"]["target_only"]["0"]).name.startswith("smollm2-mit-movie-")
    # every trained method had its lr chosen on the validation split, from the grid, by the stated rule; but
    # the one given its lr (--lr-of), which is not swept
    assert set(result["lr"]) == set(METHODS) - {"target_only"}
    assert set(result["sweep"]) == set(result["lr"]) - {"zero_sources"} and result["lr"]["zero_sources"] == 3e-3
    assert "lr given for zero_sources 0.003 (--lr-of), for the others lr per method from a sweep" in \
        (out / "results.md").read_text()
    for method, per_lr in result["sweep"].items():
        assert sorted(float(x) for x in per_lr) == [1e-3, 3e-3]
        assert result["lr"][method] in (1e-3, 3e-3)
    # the wrong-task control is the source family's expert on another task, everywhere the source is read
    wrong = yaml.safe_load(next((out / "specs").glob("wrong_task_expert-*0.yaml")).read_text())
    assert wrong["strategy"] == "heterofusion" and "gemma3-vehicles-" in wrong["sources"][0]["adapter"]
    assert wrong["sources"][0]["id"] == "gemma3-vehicles"
    # and distill_only's own wrong-task control: the same expert as its teacher, no transfer networks
    taught = yaml.safe_load(next((out / "specs").glob("distill_wrong_task-*0.yaml")).read_text())
    assert taught["strategy"] == "distill_only" and taught["sources"] == wrong["sources"]
    assert result["teacher_f1"]["distill_wrong_task"] == result["teacher_f1"]["wrong_task_expert"] is not None
    keys = {m: [t["key"] for t in json.loads((next((out / "adapters").glob(f"{m}-*0")) / "fusion_report.json")
                                             .read_text())["teacher"].values()]
            for m in ("distill_wrong_task", "wrong_task_expert", "distill_only")}
    assert keys["distill_wrong_task"] == keys["wrong_task_expert"] != keys["distill_only"]
    # update sizes: zero for the target's own expert, positive for every trained run
    assert result["update_ratio"]["target_only"][0] < 1e-6
    assert all(r > 0 for m, rs in result["update_ratio"].items() if m != "target_only" for r in rs)
    # and its parts: with every source zeroed the grounded net's dB is exactly zero, so only the added rank moves
    assert all(x["target_ranks"] < 1e-6 < x["added"] for x in result["update_parts"]["zero_sources"])
    assert all(x["target_ranks"] < 1e-6 < x["added"] for x in result["update_parts"]["added_rank_only"])
    assert set(result["nets_vs"]) == {"distill_only", "added_rank_only"}
    assert "Transfer nets vs added_rank_only" in (out / "results.md").read_text()
    assert "in added rank" in (out / "results.md").read_text()
    assert result["teacher_f1"]["zero_sources"] is not None and "teacher F1" in (out / "results.md").read_text()
    # the seeds' runs go seed by seed (every method of a seed before the next seed): a stopped job has whole seeds
    seeds = [int(r["name"].rsplit("-", 1)[1]) for r in json.loads((out / "sweep.json").read_text())["rows"]]
    assert len(seeds) == 2 * (len(METHODS) - 1) and seeds == sorted(seeds), seeds
    # --resume reuses every finished adapter, untouched: each trained method's 2 lrs at seed 0 + seed 1 at the
    # chosen lr
    weights = next((out / "adapters").glob("heterofusion*-1")) / "adapter_model.safetensors"
    before = weights.stat().st_mtime_ns
    log = _run(bench_inputs, out, "--resume", "--lr-of", "zero_sources=3e-3")
    assert log.count("reused") == 3 * (len(METHODS) - 1) - 1 and weights.stat().st_mtime_ns == before
    # --report-only prints the same table from the finished runs, and trains nothing: with a seed not run, it
    # exits non-zero naming that seed's runs, and leaves no trace of them
    shown = json.loads((out / "results.json").read_text())
    _run(bench_inputs, out, "--report-only", "--lr-of", "zero_sources=3e-3")
    again = json.loads((out / "results.json").read_text())
    assert {r["status"] for r in json.loads((out / "sweep.json").read_text())["rows"]} == {"reused"}
    assert (again["scores"], again["verdicts"]) == (shown["scores"], shown["verdicts"])
    proc = _job(bench_inputs, out, "--lr-of", "zero_sources=3e-3", "--seeds", "0", "1", "2", "--report-only")
    assert proc.returncode != 0 and "--report-only: 6 run(s) not finished with these settings" in proc.stderr
    assert all(re.search(rf"\b{m}-(lr[0-9.e-]+-)?2\b", proc.stderr) for m in METHODS if m != "target_only")
    assert not list((out / "adapters").glob("*-2")) and not list((out / "specs").glob("*-2.yaml"))
    # nor does it train an expert that is not in the cache, or start on a folder that holds no run
    for where, says in ((out, "expert of mit-movie is not in"), (tmp_path / "none", "holds no finished run")):
        proc = _job(bench_inputs, where, "--report-only", cache=tmp_path / "empty-cache")
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "none").exists() and not (tmp_path / "empty-cache").exists()
    # another count of prompts (in their own file: the spec names inputs by path) and of epochs make every spec
    # different: nothing is reused, and the runs train two at a time as a sweep on Ray, each evaluated in its
    # own task
    log = _run(bench_inputs, out, "--resume", "--seeds", "0", "--lr", "1e-3", "--parallel", "2", "--threads", "1",
               "--teach-n", "4", "--epochs", "2", "--method", '{"rdm_directions": "iid"}',
               "--lr-of", "zero_sources=3e-3")
    assert "reused" not in log
    # a control at its own given lr is still compared pair by pair with the fused strategies
    result = json.loads((out / "results.json").read_text())
    assert result["lr"]["zero_sources"] == 3e-3 and result["lr"]["heterofusion"] == 1e-3
    zero = yaml.safe_load((out / "specs" / "zero_sources-lr0.003-0.yaml").read_text())  # retrained, 2 epochs
    assert zero["training"]["lr"] == 3e-3 and zero["training"]["epochs"] == 2
    assert "zero_sources" in result["verdicts"]["heterofusion"]["vs_controls"]
    assert result["settings"]["lr_given"] == {"zero_sources": 3e-3}
    assert "lr given for zero_sources 0.003 (--lr-of)" in (out / "results.md").read_text()
    spec = yaml.safe_load((out / "specs" / "heterofusion-0.yaml").read_text())  # 1e-3: the smoke size's lr
    assert spec["training"]["epochs"] == 2 and spec["method"]["rdm_directions"] == "iid"
    assert spec["teach"]["prompts"][0]["path"].endswith("mit-restaurant-prompts-4.jsonl")
    assert len((out / "data" / "mit-restaurant-prompts-4.jsonl").read_text().splitlines()) == 4
    assert len((out / "data" / "mit-restaurant-prompts.jsonl").read_text().splitlines()) == 6  # the default's, kept
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["teach_n"] == 4 and settings["method"] == {"rdm_directions": "iid"}
    table = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["status"] for r in table] == ["trained"] * (len(METHODS) - 1)
    assert len({r["pid"] for r in table}) > 1 and os.getpid() not in {r["pid"] for r in table}
    assert all(set(r["metrics"]) == {"test mit-movie", "test mit-restaurant"} for r in table)
    assert weights.stat().st_mtime_ns == before  # seed 1 was not asked for


@pytest.mark.parametrize("item, says", [("bogus=1e-3", "'bogus' is not a trained method"),
                                        ("target_only=1e-3", "'target_only' is not a trained method"),
                                        ("zero_sources", "expected METHOD=LR"),
                                        ("zero_sources=-1", "must be a positive number"),
                                        ("zero_sources=nan", "must be a positive number"),
                                        ("zero_sources=1e-3 --lr-of zero_sources=2e-3", "given twice")])
def test_lr_of_refuses_what_it_cannot_use(tmp_path, item, says):
    cmd = [sys.executable, "jobs/benchmark_quality.py", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
           "--methods", "target_only", "zero_sources", "--lr-of", *item.split()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_paired_bootstrap_and_micro_f1():
    from hetero_ray.contrib.evaluate import micro_f1
    from hetero_ray.contrib.evaluate import paired_bootstrap as bootstrap

    better = [[(1, 1, 1)] * 60 + [(0, 1, 1)] * 40]  # F1 0.6
    worse = [[(1, 1, 1)] * 30 + [(0, 1, 1)] * 70]  # F1 0.3, the same records
    assert micro_f1(better[0]) == pytest.approx(0.6)
    ci = bootstrap(better, worse, n=500)
    assert ci["diff"] == pytest.approx(0.3) and 0 < ci["lo"] < 0.3 < ci["hi"]
    same = bootstrap(better, better, n=200)
    assert same["lo"] == same["hi"] == 0


def _adapter(path, tensors, r, alpha):
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha}))
    return path


def test_update_parts_are_the_dense_frobenius_ratios_whatever_the_ranks(tmp_path):
    import torch

    sys.path.insert(0, str(ROOT / "jobs"))
    from benchmark_quality import update_parts

    g = torch.Generator().manual_seed(0)
    key = "base_model.model.layers.0.q_proj.lora_{}.weight"
    at, bt = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    af, bf = torch.randn(6, 12, generator=g), torch.randn(10, 6, generator=g)  # rank 6, another alpha
    target = _adapter(tmp_path / "t", {key.format("A"): at, key.format("B"): bt}, 4, 8)
    fused = _adapter(tmp_path / "f", {key.format("A"): af, key.format("B"): bf}, 6, 3)
    wt, wf = 2.0 * bt @ at, 0.5 * bf @ af
    parts = update_parts(fused, target)
    assert parts["total"] == pytest.approx(float((wf - wt).norm() / wt.norm()), rel=1e-6)
    # the fused adapter's first 4 ranks against the target's, and its 2 ranks beyond
    assert parts["target_ranks"] == pytest.approx(float((0.5 * bf[:, :4] @ af[:4] - wt).norm() / wt.norm()), rel=1e-6)
    assert parts["added"] == pytest.approx(float((0.5 * bf[:, 4:] @ af[4:]).norm() / wt.norm()), rel=1e-6)
    assert all(v < 1e-6 for v in update_parts(target, target).values())


def test_lr_choice_keeps_the_target_task_then_takes_the_best_source_score():
    sys.path.insert(0, str(ROOT / "jobs"))
    from benchmark_quality import choose_lr

    val = {1e-3: {"t": 0.30, "s": 0.20}, 2e-3: {"t": 0.20, "s": 0.40}, 5e-4: {"t": 0.31, "s": 0.15}}
    assert choose_lr(val, target_val=0.30, se=0.05, tt="t", st="s") == 1e-3  # 2e-3 drops the target task
    assert choose_lr(val, target_val=0.30, se=0.20, tt="t", st="s") == 2e-3  # within 1 SE: the best source
    assert choose_lr(val, target_val=0.90, se=0.01, tt="t", st="s") == 2e-3  # none keeps it: best source
