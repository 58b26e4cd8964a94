"""The distributed pipeline on a local Ray instance shared by this module: FamilyActors -> Ray Data ->
DeepSpeed aggregator on Ray Train -> writer."""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hetero_ray.client import FusionClient
from hetero_ray.runners.local import fuse_local
from hetero_ray.runners.ray.aggregator import MemoryTrace, memory_growth
from tests.helpers import make_spec

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SPEC_OVERRIDES = {"cluster.workers": 2, "cluster.zero_stage": 3, "cluster.cpus_per_worker": 1}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from hetero_ray.runners.ray.driver import ensure_ray

    ensure_ray(num_cpus=8)
    yield
    ray.shutdown()


def _spec(zoo, tmp, name, **kw):
    return make_spec(zoo, tmp / name, name=name, **{**SPEC_OVERRIDES, "cluster.storage": str(tmp / "runs"), **kw})


def _tensors(path):
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def _max_diff(a, b):
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def zero3_run(zoo, ray_local, tmp_path_factory):
    from hetero_ray.runners.ray.driver import fuse

    tmp = tmp_path_factory.mktemp("dist")
    spec = _spec(zoo, tmp, "zero3", **{"cluster.partition": "replicate"})  # every net on both, ZeRO-3 shards
    events = []
    result = fuse(spec, on_progress=events.append)
    result.events = events
    return spec, result


def test_end_to_end_zero3_two_workers(zoo, zero3_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec, result = zero3_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(spec.target.base)), str(result.output))
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] > 0
    losses = [h["lm_loss"] for h in result.history]
    assert sum(losses[-2:]) < 0.92 * sum(losses[:2]), losses
    report = json.loads((result.output / "fusion_report.json").read_text())
    sources = {s["source_id"]: s for s in report["alignment"]["sources"]}
    assert set(sources) == {"qwen2-lora", "mistral-lora", "gemma3-lora"}
    assert {k: sorted(map(int, v["layer_pairs"])) for k, v in sources.items()} == {
        "qwen2-lora": [1, 2, 3], "mistral-lora": [0, 1, 2, 3], "gemma3-lora": [2, 3]}
    parts = report["zero"]["partitions"]
    assert [p["rank"] for p in parts] == [0, 1]
    total = report["zero"]["transfer_net_params"]
    for p in parts:  # ZeRO-3: each worker holds about half of the transfer-net parameters
        assert 0.45 < p["partition_numel"] / total < 0.55
    assert set(report["attention_mass"]) == set(report["alpha"])


def test_driver_sees_alignment_per_family_and_every_training_step(zero3_run):
    """The driver's progress callback gets alignment events per family and, through the progress actor,
    each training step's metrics from the Train controller: what the terminal bars draw."""
    from hetero_ray.progress import TerminalBars

    _, result = zero3_run
    align = [e for e in result.events if e["stage"] == "align"]
    assert {e["family"] for e in align} == {"qwen2", "mistral", "gemma3"}
    assert all(e["family_total"] >= 1 and e["source_id"] for e in align)
    train = [e for e in result.events if e["stage"] == "train"]
    assert [e["step"] for e in train] == list(range(1, len(result.history) + 1))
    assert train[-1]["total_steps"] == len(result.history) and "lm_loss" in train[-1]
    bars = TerminalBars(disable=False)
    for e in result.events:
        bars(e)
    assert bars.bars["train"].n == len(result.history)
    bars.close()


def test_the_train_controller_polls_often_so_that_reports_do_not_stretch_the_steps(zero3_run):
    """Each step reports to Ray Train, whose controller takes one report per worker each time it polls them
    (Ray's default: every 2 s), so a step lasted at least a poll. The driver sets the poll interval through
    the variable Ray passes from the driver to the controller; rank 0's wall time per step is in the report,
    where jobs/benchmark_scale.py reads it."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE

    from hetero_ray.runners.ray.driver import CONTROLLER_POLL_ENV

    name, value = CONTROLLER_POLL_ENV
    assert name in ENV_VARS_TO_PROPAGATE and float(value) <= 0.1
    assert os.environ[name] == value  # set by fuse() before the trainer starts its controller
    _, result = zero3_run
    assert result.report["zero"]["step_wall_s"] > 0


def test_many_aligners_per_family_give_the_same_adapter(zoo, zero3_run, tmp_path, monkeypatch):
    """With 2 FamilyActors per family (as 8 cores give 3 families), each family's one source is split into
    chunks of layers that spread over both, and the fused adapter is the one a single aligner per family
    gives."""
    from hetero_ray.runners.ray import driver

    assert driver.aligners_per_family(8, 3) == 2 and driver.aligners_per_family(2, 3) == 1
    assert driver.aligners_per_family(16, 1) == 16
    monkeypatch.setattr(driver, "aligners_per_family", lambda cpus, families: 2)  # whatever the machine's cores
    spec, result = zero3_run
    events = []
    spec2 = _spec(zoo, tmp_path, "aligners")
    res2 = driver.fuse(spec2, on_progress=events.append)
    align = [e for e in events if e["stage"] == "align"]
    for fam in ("qwen2", "mistral", "gemma3"):
        assert {e["aligner"] for e in align if e["family"] == fam} == {0, 1}, fam
    # one source per family, 4 tasks wanted from it: one layer each (qwen2 has 3 aligned layers, mistral 4, gemma3 2)
    assert len(align) == 9 and all(e["layers"] != "all" for e in align)
    assert _max_diff(_tensors(result.output), _tensors(res2.output)) < 1e-6  # as the fault tests hold


def test_candidates_through_ray_are_the_in_process_ones_and_the_benchmark_splits_the_pass(zoo, ray_local, tmp_path,
                                                                                         monkeypatch):
    """The FamilyActors' Arrow tables, read back as a worker reads them, give the candidates an in-process
    alignment makes: the same factors, scale and tokens; here each source aligns whole, in one task (the
    other tests of this module split sources into chunks of layers). The pipeline benchmark's Ray pass
    (which this drives) splits its time into the driver's open, the actors' start, the tasks and the
    Dataset."""
    sys.path.insert(0, str(ROOT / "jobs"))
    from benchmark_pipeline import align_pass, ray_align_pass

    from hetero_ray.runners.ray import driver
    from hetero_ray.tokens.candidates import candidates_from_arrow

    monkeypatch.setattr(driver, "TASKS_PER_ALIGNER", 1)  # 1 aligner per family, 1 source each: whole sources
    monkeypatch.setattr(driver, "aligners_per_family", lambda cpus, families: 1)  # whatever the machine's cores
    divided, real = [], driver.layer_chunks
    monkeypatch.setattr(driver, "layer_chunks", lambda *a: divided.append(real(*a)) or divided[-1])

    spec = _spec(zoo, tmp_path, "arrow")
    *_, local = align_pass(spec, keep=True)
    parts: dict = {}
    ds = ray_align_pass(spec, parts)
    got = [c for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) for c in candidates_from_arrow(t)]
    assert sorted(c.key for c in got) == sorted(c.key for c in local) and len(got) == len(local) > 0
    by_key = {(c.key, c.role): c for c in local}
    for c in got:
        want = by_key[(c.key, c.role)]
        assert c.scale == want.scale
        assert torch.equal(c.a, want.a) and torch.equal(c.b, want.b) and torch.equal(c.tokens, want.tokens)
    assert any(c.scale != 1.0 for c in got)  # the scale travels beside B, not folded into it
    assert set(parts) == {"open", "to_first_task", "tasks", "dataset"} and all(v >= 0 for v in parts.values())
    assert divided and all(layers is None for chunks in divided for _, layers in chunks)  # whole sources, as said


def test_one_worker_zero0_matches_two_workers_zero3(zoo, zero3_run, tmp_path):
    """Same spec and seed: 1 worker ZeRO-0 vs 2 workers ZeRO-3, and the in-process reference. The only
    differences are float summation orders (micro-batch gradients summed per worker, then all-reduced)."""
    from hetero_ray.runners.ray.driver import fuse

    spec, two = zero3_run
    one = fuse(spec.model_copy(update={"output": tmp_path / "one",
                                       "cluster": spec.cluster.model_copy(update={"workers": 1, "zero_stage": 0}),
                                       "name": "zero0"}))
    local = fuse_local(spec.model_copy(update={"output": tmp_path / "local"}))
    a, b, c = _tensors(two.output), _tensors(one.output), _tensors(local.output)
    scale = max(float(v.abs().max()) for v in a.values())
    assert _max_diff(a, b) < 1e-4 * scale, _max_diff(a, b)
    assert _max_diff(b, c) < 1e-4 * scale, _max_diff(b, c)
    torch.testing.assert_close([h["lm_loss"] for h in one.history], [h["lm_loss"] for h in local.history],
                               rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def groups_run(zoo, ray_local, tmp_path_factory):
    """2 workers that each own some module groups, with the global gradient norm clipped (so that the
    clipping DeepSpeed does over both workers' parts is exercised)."""
    from hetero_ray.runners.ray.driver import fuse

    tmp = tmp_path_factory.mktemp("groups")
    spec = _spec(zoo, tmp, "groups", **{"cluster.partition": "groups", "training.max_grad_norm": 0.05})
    return spec, fuse(spec)


def test_workers_owning_groups_split_the_nets_and_match_in_process(zoo, groups_run, tmp_path, request):
    """Each worker holds only its groups' nets and candidates; the adapter is the in-process one (which
    holds every net) within float summation order, clipping included."""
    spec, two = groups_run
    report = json.loads((two.output / "fusion_report.json").read_text())
    assert report["zero"]["partition"] == "groups" and report["zero"]["stage"] == 0
    parts = report["zero"]["partitions"]
    owned = [set(p["groups"]) for p in parts]
    assert len(owned) == 2 and all(owned) and not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(report["alpha"]) == set(report["attention_mass"])
    total = report["zero"]["transfer_net_params"]
    assert sum(p["partition_numel"] for p in parts) == total + len(report["alpha"])  # nets + an alpha each
    assert all(p["partition_numel"] < 0.8 * total for p in parts)
    # memory as the workers saw it, mark by mark (benchmark_scale compares the growth with `check`): its
    # own heap, shared memory (the object store) and the peak, which never falls
    for p in parts:
        marks = p["memory_mib"]
        assert set(marks) == set(MemoryTrace.MARKS), marks
        peaks = [marks[k]["peak"] for k in MemoryTrace.MARKS]
        assert peaks == sorted(peaks), marks
        assert all(0 < m["anon"] <= m["peak"] and m["shmem"] >= 0 for m in marks.values()), marks
        grown = memory_growth(marks)
        assert 0 < grown["setup"] <= grown["total"] and 0 < grown["own"] <= grown["total"], grown
        # the baseline holds every library's code (PEFT and transformers' model classes alone are ~110 MiB,
        # once imported on first use after it): tiny models and candidates add a few MiB of heap in setup
        assert marks["setup"]["anon"] - marks["start"]["anon"] < 50, marks
    # each worker read only its own groups' candidates: together, each candidate once
    zero3 = request.getfixturevalue("zero3_run")[1]
    one = zero3.report["zero"]["partitions"]
    assert all(p["candidate_rows"] == one[0]["candidate_rows"] for p in one)  # replicated: all of them each
    assert sum(p["candidate_rows"] for p in parts) == one[0]["candidate_rows"]
    assert all(0 < p["candidate_rows"] < one[0]["candidate_rows"] for p in parts)
    assert zero3.report["zero"]["partition"] == "replicate"
    local = fuse_local(spec.model_copy(update={"output": tmp_path / "local"}))
    a, b = _tensors(two.output), _tensors(local.output)
    scale = max(float(v.abs().max()) for v in a.values())
    assert _max_diff(a, b) < 1e-4 * scale, _max_diff(a, b)
    torch.testing.assert_close([h["lm_loss"] for h in two.history], [h["lm_loss"] for h in local.history],
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close([h["rdm"] for h in two.history], [h["rdm"] for h in local.history],
                               rtol=1e-3, atol=1e-5)
    # the clip was active: without it the run goes elsewhere
    free = fuse_local(spec.model_copy(update={"output": tmp_path / "free", "training": spec.training.model_copy(
        update={"max_grad_norm": None})}))
    assert _max_diff(_tensors(free.output), b) > 1e-3 * scale


def test_rerun_of_a_finished_spec_resumes_instead_of_retraining(zoo, zero3_run, tmp_path):
    from hetero_ray.runners.ray.driver import fuse

    spec, first = zero3_run
    t0 = time.perf_counter()
    again = fuse(spec.model_copy(update={"output": tmp_path / "again"}))
    assert len(again.history) == len(first.history)
    assert _max_diff(_tensors(first.output), _tensors(again.output)) == 0.0
    assert again.report["timings_s"]["train_s"] < 0.5 * first.report["timings_s"]["train_s"] + 30
    assert time.perf_counter() - t0 < 120


@pytest.mark.parametrize("point,run", [("actor", "zero3_run"), ("actor", "groups_run"), ("worker", "zero3_run"),
                                       ("worker", "groups_run")])
def test_killed_actor_or_worker_still_gives_the_undisturbed_output(zoo, tmp_path, monkeypatch, point, run, request):
    """A killed FamilyActor is restarted and its task retried (with owners, a task that returns one table
    per worker); a killed train worker restarts the group from the last checkpoint (with replicated nets, and
    with each worker owning its groups: every owner's part is restored)."""
    from hetero_ray.runners.ray.driver import fuse

    spec, undisturbed = request.getfixturevalue(run)
    marker = tmp_path / "fault-happened"
    monkeypatch.setenv("HETERO_RAY_FAULT", f"{point}:{marker}" + (":4" if point == "worker" else ""))
    result = fuse(spec.model_copy(update={"output": tmp_path / "out", "name": f"fault-{point}-{spec.name}"}))
    assert marker.exists()  # the fault did happen
    assert _max_diff(_tensors(undisturbed.output), _tensors(result.output)) < 1e-6
    assert [h["step"] for h in result.history] == list(range(1, len(undisturbed.history) + 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path_factory):
    """A separate head started with `ray start --head` on 127.0.0.1, stopped by its own processes only."""
    temp = Path(f"/tmp/hr-{os.getpid()}")  # short: Ray's socket paths must stay under 107 characters
    port, dash, *agent = (_free_port() for _ in range(6))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "DS_ACCELERATOR": "cpu"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8",
                    f"--temp-dir={temp}", "--disable-usage-stats",
                    # own agent ports: another Ray instance on this host holds the defaults
                    f"--dashboard-agent-listen-port={agent[0]}", f"--dashboard-agent-grpc-port={agent[1]}",
                    f"--runtime-env-agent-port={agent[2]}", f"--metrics-export-port={agent[3]}"],
                   check=True, env=env, capture_output=True)
    yield f"http://127.0.0.1:{dash}", env, ray_bin
    stop_processes_using(temp)
    shutil.rmtree(temp, ignore_errors=True)


def stop_processes_using(path: Path, grace_s: float = 15) -> None:
    """SIGTERM every process whose command line names ``path``, then SIGKILL what is left after ``grace_s``
    (the GCS server may outlive a SIGTERM): the suite leaves nothing running."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        if str(path) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            procs.append(p)
            with contextlib.suppress(psutil.Error):
                p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def _submit(address, env, ray_bin, spec, tmp_path, **cluster):
    """Write ``spec`` (with a fresh output and storage) to a file and submit jobs/fuse.py on it."""
    import yaml

    data = spec.model_dump(mode="json")
    data.update(output=str(tmp_path / "job-out"), name="job")
    data["cluster"].update(storage=str(tmp_path / "runs"), **cluster)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    job_id, deadline = None, time.monotonic() + 60
    while job_id is None:  # right after start the job agent may answer "No available agent"
        proc = subprocess.run([ray_bin, "job", "submit", "--address", address, "--no-wait", "--working-dir",
                               str(ROOT), "--", "python", "jobs/fuse.py", str(spec_file)],
                              env=env, capture_output=True, text=True)
        found = re.search(r"(raysubmit_\w+)", proc.stdout + proc.stderr)
        if found:
            job_id = found.group(1)
        elif time.monotonic() > deadline:
            pytest.fail(proc.stdout + proc.stderr)
        else:
            time.sleep(3)
    return job_id


def test_ray_job_submit_produces_the_same_adapter(zoo, zero3_run, tmp_path, ray_head):
    address, env, ray_bin = ray_head
    spec, reference = zero3_run
    job_id = _submit(address, env, ray_bin, spec, tmp_path)
    client = FusionClient(address)
    assert client.wait(job_id, timeout_s=900) == "SUCCEEDED", "\n".join(client.logs(job_id))
    out = client.result(job_id)
    assert out.adapter == tmp_path / "job-out" and out.report.is_file()
    assert _max_diff(_tensors(reference.output), _tensors(out.adapter)) < 1e-6
    status = client.status(job_id)
    assert status["status"] == "SUCCEEDED" and status["progress"] is not None


def _bindable(port: int) -> bool:
    """Whether nothing on this host listens on `port` (on any address: worker nodes bind the host's own)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _cluster_ports(rng, nodes: int) -> tuple[int, int] | None:
    """A GCS port and a dashboard port for cluster/local_cluster.sh, every port it derives from them free, all
    below the kernel's ephemeral range (32768+), where outgoing connections and other instances' randomly
    chosen ports land, and above Ray's default worker ports (10002-19999), which a running instance holds."""
    base = rng.randrange(20000, 22600, 100)  # the head's own ports are base+10000..+10099 <= 32699
    dash = base + 10200
    ports = [base, dash, *range(base + 10001, base + 10100)]
    for i in range(1, nodes + 1):
        ports += range(base + 100 * i + 1, base + 100 * i + 100)
    return (base, dash) if all(_bindable(p) for p in ports) else None


@pytest.fixture
def local_cluster():
    """cluster/local_cluster.sh: a head with 1 CPU and two worker nodes with 2 CPUs each, on this host. A start
    that fails (a port taken between the check and Ray's bind) is stopped and tried again on other ports, up to
    three times; the last failure shows what the script and Ray's logs said."""
    import random
    rng = random.Random(os.getpid() ^ time.time_ns())
    script = str(ROOT / "cluster" / "local_cluster.sh")
    failures = []
    for _ in range(3):
        ports = next(filter(None, (_cluster_ports(rng, 2) for _ in range(50))), None)
        assert ports is not None, "no free port range for a local cluster in 20000-32767"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
        env.update(HR_CLUSTER_DIR=f"/tmp/hrc-{os.getpid()}", HR_PORT=str(ports[0]),
                   HR_DASHBOARD_PORT=str(ports[1]), HR_HEAD_CPUS="1", HR_CPUS_PER_NODE="2",
                   RAY_BIN=str(Path(sys.executable).parent / "ray"), DS_ACCELERATOR="cpu")
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True)
        try:
            started = subprocess.run(["bash", script, "start", "2"], env=env, capture_output=True, text=True,
                                     timeout=120)
            if started.returncode == 0:
                break
            said = f"exit {started.returncode}\n{started.stdout}{started.stderr}"
        except subprocess.TimeoutExpired as e:  # a start stuck on a port: its processes are stopped below
            said = f"no answer in 120 s\n{e.stdout or ''}{e.stderr or ''}"
        cluster_dir = Path(env["HR_CLUSTER_DIR"])
        ray_logs = cluster_dir / "ray" / "session_latest" / "logs"
        logs = [*sorted(cluster_dir.glob("*.log")), *sorted(ray_logs.glob("*.err")),
                *sorted(ray_logs.glob("[rg]*.out"))]
        failures.append(f"ports {ports}: {said}" + "".join(
            f"\n--- {f.name}\n{f.read_text(errors='replace')[-2000:]}" for f in logs if f.is_file()))
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True)
    else:
        pytest.fail("cluster/local_cluster.sh start 2 failed three times:\n" + "\n".join(failures))
    yield f"http://127.0.0.1:{env['HR_DASHBOARD_PORT']}", env
    subprocess.run(["bash", script, "stop"], env=env, capture_output=True)
    # nothing of the cluster outlives stop: Ray's agents rename themselves and once survived it, spinning a core
    left = _cluster_processes(env["HR_CLUSTER_DIR"])
    assert not left, f"local_cluster.sh stop left processes of the cluster running: {left}"


def _cluster_processes(cluster_dir: str) -> list[str]:
    """'pid name' of every live process holding a file open under ``cluster_dir`` (its Ray logs)."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(os.readlink(fd).startswith(cluster_dir + "/") for fd in (proc / "fd").iterdir()):
                out.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
        except OSError:
            continue
    return out


def test_multi_node_cluster_runs_one_worker_per_node_and_gives_the_same_adapter(zoo, zero3_run, tmp_path,
                                                                                 local_cluster):
    """Each Train worker asks for 2 CPUs, which only a worker node has: the two ZeRO-3 ranks run on two
    different nodes, and the fused adapter is the one a single node gives."""
    address, env = local_cluster
    spec, reference = zero3_run
    job_id = _submit(address, env, env["RAY_BIN"], spec, tmp_path, cpus_per_worker=2.0)
    client = FusionClient(address)
    assert client.wait(job_id, timeout_s=900) == "SUCCEEDED", "\n".join(client.logs(job_id))
    out = client.result(job_id)
    report = json.loads(out.report.read_text())
    nodes = {p["node_id"] for p in report["zero"]["partitions"]}
    assert len(nodes) == 2
    assert _max_diff(_tensors(reference.output), _tensors(out.adapter)) < 1e-6


@pytest.mark.parametrize("strategy,net,cluster,grad_accum,balance", [
    # qwen2 answers 2 more prompts than gemma3, and every source weighs the same: the weights travel too
    ("heterofusion", "grounded", {"partition": "groups"}, 2, "sources"),
    # one micro-batch a window: the second worker has none, every window, and its ZeRO-2 buckets must still
    # hold a (zero) gradient for every parameter, added rank included
    ("distill_only", "paper", {"partition": "replicate", "zero_stage": 2}, 1, "tokens")],
    ids=["owners-heterofusion-grounded-balanced", "replicate-zero2-distill_only-one-micro-batch"])
def test_teacher_signals_on_ray_match_in_process(zoo, ray_local, tmp_path, strategy, net, cluster, grad_accum,
                                                 balance, monkeypatch):
    """FamilyActors compute the teacher signals, Ray Data carries the teacher examples to 2 workers (owning
    module groups, or replicated under ZeRO-2), which train with every objective term and added rank: the
    same adapter as in-process. With 2 FamilyActors per family (heterofusion), the first teaches and the
    second aligns."""
    from hetero_ray.contrib import tiny
    from hetero_ray.runners.ray import driver
    from hetero_ray.runners.ray.driver import fuse

    if strategy == "heterofusion":
        monkeypatch.setattr(driver, "aligners_per_family", lambda cpus, families: 2)  # whatever the machine's cores

    prompts = [{"path": str(zoo["replay"]), "take": 4}]
    if balance == "sources":
        more = tiny.write_jsonl(tiny.color_task_records(2, seed=7), tmp_path / "qwen2-only.jsonl")
        prompts.append({"path": str(more), "sources": ["qwen2-lora"]})
    spec = _spec(zoo, tmp_path, f"teach-{strategy}", sources=("qwen2", "gemma3"), strategy=strategy,
                 teach={"prompts": prompts, "max_new_tokens": 6, "balance": balance},
                 objective={"paper": 1.0, "distill": 1.0, "excess": 0.5, "retain": 0.5},
                 method={"num_projections": 16, "net": net, "extra_rank": 2},
                 training={"epochs": 1, "lr": 3e-3, "grad_accum": grad_accum, "batch_size": 2, "max_length": 64},
                 **{f"cluster.{k}": v for k, v in cluster.items()})
    events = []
    ray_result = fuse(spec, on_progress=events.append)
    align = [e for e in events if e["stage"] == "align"]
    if strategy == "heterofusion":
        for fam in ("qwen2", "gemma3"):
            assert {(e["layers"] == "teacher", e["aligner"]) for e in align if e["family"] == fam} == {
                (True, 0), (False, 1)}, fam
    local = fuse_local(spec.model_copy(update={"output": tmp_path / "local"}))
    a, b = _tensors(ray_result.output), _tensors(local.output)
    assert a.keys() == b.keys()
    scale = max(float(v.abs().max()) for v in a.values())
    assert _max_diff(a, b) < 1e-4 * scale, _max_diff(a, b)
    report = json.loads((ray_result.output / "fusion_report.json").read_text())
    assert set(report["teacher"]) == {"qwen2-lora", "gemma3-lora"}
    answers = {"qwen2-lora": 6 if balance == "sources" else 4, "gemma3-lora": 4}
    assert {k: v["answers"] for k, v in report["teacher"].items()} == answers
    assert all(v["dropped_chunks"] == 0 for v in report["teacher"].values())
