"""A corpus of malformed and hostile inputs, run through the CLI as a user would.

Every case builds its own workspace (copies of the tiny zoo's target, sources, bases and replay file plus a
spec with relative paths), breaks one thing, runs ``hetero-ray ...`` in this process and asserts:
- the exit code (2: bad input or setup), with no Python stack on stderr;
- a message naming the file and the field or key, and what is wrong;
- that no input changed or vanished (every file of the workspace and of the shared zoo hashed before and
  after), and that nothing new was left behind (no output, no temporary directory).
Almost every case fails before a model is built, so the whole table runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from hetero_ray.cli import main
from hetero_ray.io.adapters import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers import Workspace, tree_state

SRC_KEY = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"


@dataclass
class Case:
    name: str
    setup: Callable[[Workspace], list[str]]  # breaks the workspace, returns the CLI arguments
    expect: tuple[str, ...]  # substrings of stderr; "{ws}" is the workspace path
    code: int = 2


def _set(section: str, key: str, value):
    def setup(ws: Workspace) -> list[str]:
        if section:
            ws.spec[section] = {**ws.spec.get(section, {}), key: value}
        else:
            ws.spec[key] = value
        return ws.fuse()

    return setup


def _output(value, overwrite=True, prepare: Callable[[Workspace], None] | None = None):
    def setup(ws: Workspace) -> list[str]:
        if prepare:
            prepare(ws)
        ws.spec["output"] = value
        ws.spec["overwrite"] = overwrite
        return ws.fuse()

    return setup


def _symlink_to_sources(ws: Workspace) -> None:
    os.symlink(ws.root, ws.path("mirror"))


def _user_dir(ws: Workspace) -> None:
    ws.path("mine").mkdir()
    ws.path("mine/notes.txt").write_text("someone's work")


def _link_to_user_dir(ws: Workspace) -> None:
    ws.path("elsewhere").mkdir()
    ws.path("elsewhere/keep.txt").write_text("keep")
    os.symlink(ws.path("elsewhere"), ws.path("out-link"))


def _config(rel: str, fn):
    def setup(ws: Workspace) -> list[str]:
        ws.edit_config(rel, fn)
        return ws.fuse()

    return setup


def _raw(rel: str, data: bytes, then: str = "fuse"):
    def setup(ws: Workspace) -> list[str]:
        ws.path(rel).write_bytes(data)
        return ws.fuse() if then == "fuse" else ["inspect", str(ws.path(rel).parent)]

    return setup


def _tensors(rel: str, fn):
    def setup(ws: Workspace) -> list[str]:
        ws.edit_tensors(rel, fn)
        return ws.fuse()

    return setup


def _zero_rank(t: dict) -> None:
    a, b = t[SRC_KEY.format("A")], t[SRC_KEY.format("B")]
    t[SRC_KEY.format("A")] = a.new_zeros(0, a.shape[1])
    t[SRC_KEY.format("B")] = b.new_zeros(b.shape[0], 0)


def _pickled_ints(ws: Workspace) -> list[str]:
    src = ws.path("src-qwen2")
    torch.save({k: 7 for k in load_file(str(src / WEIGHTS_NAME))}, src / "adapter_model.bin")
    (src / WEIGHTS_NAME).unlink()
    return ws.fuse("--allow-pickle")


def _pickled(ws: Workspace) -> list[str]:
    src = ws.path("src-qwen2")
    torch.save(load_file(str(src / WEIGHTS_NAME)), src / "adapter_model.bin")
    (src / WEIGHTS_NAME).unlink()
    return ws.fuse()


def _no_weights(ws: Workspace) -> list[str]:
    for p in ws.path("target-base").glob("*.safetensors"):
        p.unlink()
    return ws.fuse()


def _expert(out: str, *flags: str, prepare: Callable[[Workspace], None] | None = None, task: str = "replay.jsonl"):
    def setup(ws: Workspace) -> list[str]:
        if prepare:
            prepare(ws)
        return ["expert", "--base", str(ws.path("target-base")), "--task", str(ws.path(task)), "--out",
                str(ws.path(out)), "--steps", "1", *flags]

    return setup


def _task_dir(ws: Workspace) -> None:
    ws.path("tasks").mkdir()
    shutil.copy(ws.path("replay.jsonl"), ws.path("tasks/replay.jsonl"))


def _copy_base_as(name: str):
    return lambda ws: shutil.copytree(ws.path("target-base"), ws.path(name))


def _check_cmd(fn):
    def setup(ws: Workspace) -> list[str]:
        fn(ws)
        return ["check", ws.write_spec()]

    return setup


def _hidden(c: dict) -> None:
    c["hidden_size"] = c["hidden_size"] * 2


def _phi3_heads(c: dict) -> None:  # same width, other head count: q is no longer the first rows it claims
    c["num_attention_heads"], c["num_key_value_heads"] = c["num_attention_heads"] * 2, c["num_key_value_heads"]
    c["head_dim"] = c["hidden_size"] // c["num_attention_heads"]


def _target_as_source(ws: Workspace) -> list[str]:
    ws.spec["sources"] = [{"adapter": "target-lora", "id": "again"}, ws.spec["sources"][0]]
    return ws.fuse()


def _same_source_twice(ws: Workspace) -> list[str]:
    ws.spec["sources"] = [{"adapter": "src-qwen2", "id": "one"}, {"adapter": "./src-qwen2/", "id": "two"}]
    return ws.fuse()


def _replay(text: str, **entry):
    def setup(ws: Workspace) -> list[str]:
        ws.path("replay.jsonl").write_text(text)
        ws.spec["replay"] = [{"path": "replay.jsonl", **entry}]
        return ws.fuse()

    return setup


def _nested_yaml(ws: Workspace) -> list[str]:
    return ["fuse", ws.write_spec("a: " + "[" * 20000 + "]" * 20000 + "\n"), "--no-ray"]


def _spec_text(text: bytes | str):
    def setup(ws: Workspace) -> list[str]:
        p = ws.path("spec.yaml")
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["fuse", str(p), "--no-ray"]

    return setup


CASES = [
    # --- data loss: an output that is, holds or lies inside an input -------------------------------------
    Case("output-is-target-adapter", _output("target-lora"), ("output:", "is the input target.adapter")),
    Case("output-reaches-source-through-symlink", _output("mirror/src-qwen2", prepare=_symlink_to_sources),
         ("mirror/src-qwen2", "real path", "is the input sources[0].adapter")),
    Case("output-is-the-inputs-directory", _output("."), ("output:", "contains the input target.base")),
    Case("output-inside-target-base", _output("target-base/fused"), ("lies inside the input target.base",)),
    Case("output-is-the-replay-file", _output("replay.jsonl"), ("is the input replay[0].path",)),
    Case("output-is-source-base-file", _output("phi3-base/config.json"), ("lies inside the input sources[1].base",)),
    Case("output-is-symlink-to-a-directory", _output("out-link", prepare=_link_to_user_dir),
         ("out-link is a symbolic link",)),
    Case("output-is-an-existing-file", _output("spec-notes.txt", prepare=lambda ws: ws.path("spec-notes.txt")
                                                .write_text("x")), ("spec-notes.txt is an existing file",)),
    Case("output-parent-is-a-file", _output("notes.txt/fused", prepare=lambda ws: ws.path("notes.txt")
                                            .write_text("x")), ("its parent", "notes.txt is a file")),
    Case("output-is-someone-elses-directory", _output("mine", prepare=_user_dir),
         ("mine exists and was not written by hetero-ray",)),
    Case("output-exists-without-overwrite", _output("mine", overwrite=False, prepare=_user_dir),
         ("mine already exists", "overwrite")),
    Case("run-name-escapes-storage", _set("", "name", "../../escaped-run"), ("name:", "should match pattern")),
    Case("run-dir-inside-an-input", _set("cluster", "storage", "target-lora"),
         ("cluster.storage/name", "lies inside the input target.adapter")),
    Case("expert-out-is-an-existing-model", _expert("other-model", prepare=_copy_base_as("other-model")),
         ("expert: out:", "other-model already exists")),
    Case("expert-out-is-its-base", _expert("target-base", "--overwrite"), ("out:", "is the input base")),
    Case("expert-out-contains-its-task", _expert("tasks", "--overwrite", task="tasks/replay.jsonl", prepare=_task_dir),
         ("out:", "contains the input --task")),
    Case("expert-overwrite-refuses-foreign-directory", _expert("mine", "--overwrite", prepare=_user_dir),
         ("mine exists and was not written by hetero-ray",)),
    # --- adapter_config.json as a schema ------------------------------------------------------------------
    Case("config-is-a-list", _config("src-qwen2", lambda c: [c]), ("src-qwen2/adapter_config.json",
                                                                     "expected a JSON object")),
    Case("config-not-utf8", _raw("src-qwen2/adapter_config.json", b'{"r": "\xff\xfe"}'),
         ("src-qwen2/adapter_config.json", "not UTF-8")),
    Case("config-deeply-nested", _raw("src-qwen2/adapter_config.json", b"[" * 100000 + b"]" * 100000),
         ("src-qwen2/adapter_config.json", "nested too deeply")),
    Case("config-r-is-a-word", _config("src-qwen2", lambda c: c.update(r="four")), ("field r", "'four'")),
    Case("config-r-is-zero", _config("src-qwen2", lambda c: c.update(r=0)), ("field r", "integer >= 1")),
    Case("config-r-disagrees-with-tensors", _config("src-qwen2", lambda c: c.update(r=8)),
         ("src-qwen2/adapter_model.safetensors", "rank 2", "r = 8")),
    Case("inspect-r-disagrees-with-tensors", lambda ws: (ws.edit_config("src-qwen2", lambda c: c.update(r=8)),
                                                         ["inspect", str(ws.path("src-qwen2"))])[1],
         ("src-qwen2/adapter_model.safetensors", "r = 8")),
    Case("config-negative-alpha", _config("src-qwen2", lambda c: c.update(lora_alpha=-4)),
         ("field lora_alpha", "> 0", "-4")),
    Case("config-alpha-is-text", _config("src-qwen2", lambda c: c.update(lora_alpha="16")), ("field lora_alpha",)),
    Case("config-rslora-not-bool", _config("src-qwen2", lambda c: c.update(use_rslora="yes")),
         ("field use_rslora",)),
    Case("config-rank-pattern-bad", _config("src-qwen2", lambda c: c.update(rank_pattern={"q_proj": -1})),
         ("field rank_pattern['q_proj']",)),
    Case("config-not-lora", _config("src-qwen2", lambda c: c.update(peft_type="IA3")), ("peft_type is 'IA3'",)),
    # --- tensors ------------------------------------------------------------------------------------------
    Case("tensor-declared-int32", _tensors("src-qwen2", lambda t: t.update(
        {SRC_KEY.format("B"): t[SRC_KEY.format("B")].view(torch.int32)})),
        ("src-qwen2/adapter_model.safetensors", SRC_KEY.format("B"), "dtype I32", "floating point")),
    Case("tensor-zero-rank", _tensors("src-qwen2", _zero_rank), (SRC_KEY.format("A"), "empty factor")),
    Case("tensor-nan", _tensors("src-qwen2", lambda t: t[SRC_KEY.format("A")].view(-1).__setitem__(0, float("inf"))),
         (SRC_KEY.format("A"), "non-finite")),
    Case("pickle-refused-names-the-real-flag", _pickled, ("adapter_model.bin", "--allow-pickle")),
    Case("pickle-of-plain-ints", _pickled_ints, ("adapter_model.bin", "holds a int", "not a tensor")),
    # --- bases against adapters ---------------------------------------------------------------------------
    Case("target-base-hidden-size-disagrees", _config("target-base", _hidden),
         ("target-lora/adapter_model.safetensors", "target-base/config.json", "gives d_in")),
    Case("check-sees-the-hidden-size-mismatch", _check_cmd(lambda ws: ws.edit_config("target-base", _hidden)),
         ("target-base/config.json", "not trained on this base")),
    Case("phi3-base-disagrees-with-fused-qkv", _config("phi3-base", _phi3_heads),
         ("src-phi3/adapter_model.safetensors", "self_attn.qkv_proj", "phi3-base/config.json")),
    Case("target-base-without-weights", _no_weights, ("target.base", "no *.safetensors weights")),
    Case("target-base-without-config", lambda ws: (ws.path("target-base/config.json").unlink(), ws.fuse())[1],
         ("target.base", "no config.json")),
    Case("unknown-family", _set("target", "family", "falcon"), ("unknown family 'falcon'",)),
    # --- replay files -------------------------------------------------------------------------------------
    Case("replay-not-utf8", _raw("replay.jsonl", b'{"instruction": "\xff", "output": "x"}\n'),
         ("replay[0]", "replay.jsonl", "not UTF-8")),
    Case("replay-empty", _replay(""), ("replay[0]", "replay.jsonl", "no records")),
    Case("replay-take-more-than-there-is", _replay(
        "".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(24)), take=1000),
        ("replay[0]", "take is 1000", "holds 24 records")),
    Case("replay-record-without-instruction", _replay('{"output": "x"}\n'), ("replay[0]", "record 0",
                                                                             "instruction")),
    Case("replay-missing", _set("", "replay", [{"path": "nowhere.jsonl"}]), ("replay[0].path", "does not exist")),
    Case("replay-take-is-a-bool", _set("", "replay", [{"path": "replay.jsonl", "take": True}]), ("replay.0.take",)),
    # --- the spec itself ----------------------------------------------------------------------------------
    Case("spec-deeply-nested-yaml", _nested_yaml, ("spec.yaml", "nested too deeply")),
    Case("spec-not-utf8", _spec_text(b"output: \xff\xfe\n"), ("spec.yaml", "not UTF-8")),
    Case("spec-top-level-list", _spec_text("- output: x\n"), ("spec.yaml", "expected a mapping")),
    Case("spec-seed-too-large", _set("", "seed", 2**70), ("seed:", "less than 4294967296")),
    Case("spec-block-size-zero", _set("method", "block_size", 0), ("method.block_size",)),
    Case("spec-heads-do-not-divide-width", _set("method", "num_heads", 3), ("method.num_heads", "do not divide",
                                                                            "method.embed_dim")),
    Case("spec-heads-and-width-disagree", lambda ws: (ws.spec.update(method={"embed_dim": 64, "num_heads": 5}),
                                                      ws.fuse())[1], ("method", "does not divide embed_dim 64")),
    Case("spec-lr-infinite", _set("training", "lr", float("inf")), ("training.lr",)),
    Case("spec-lr-nan", _set("training", "lr", float("nan")), ("training.lr",)),
    Case("spec-target-is-also-a-source", _target_as_source, ("sources[0].adapter", "same adapter as target.adapter")),
    Case("spec-same-source-twice", _same_source_twice, ("sources[1].adapter", "same adapter as sources[0].adapter")),
    Case("spec-output-wrong-type", _set("", "output", ["a", "b"]), ("output:",)),
    Case("run-dir-via-file-uri-inside-an-input", lambda ws: (ws.spec.update(
        cluster={**ws.spec["cluster"], "storage": f"file://{ws.path('target-lora')}"}), ws.fuse())[1],
        ("cluster.storage/name", "lies inside the input target.adapter")),
    Case("output-is-the-run-directory", lambda ws: (ws.spec.update(
        name="run1", output="runs/run1", cluster={**ws.spec["cluster"], "storage": "runs"}), ws.fuse())[1],
        ("output:", "is the input cluster.storage/name (the run directory)")),
    Case("output-is-a-base-named-only-by-an-adapter", lambda ws: (ws.spec.update(overwrite=True, output=json.loads(
        (ws.path("src-qwen2") / CONFIG_NAME).read_text())["base_model_name_or_path"]), ws.fuse())[1],
        ("is the input sources[0].adapter's base_model_name_or_path",)),
    Case("output-grandparent-is-a-file", _output("notes.txt/sub/fused", prepare=lambda ws: ws.path("notes.txt")
                                                 .write_text("x")), ("its parent", "notes.txt is a file")),
    Case("base-text-config-not-an-object", _config("phi3-base", lambda c: c.update(text_config="phi3")),
         ("phi3-base/config.json", "field text_config")),
    Case("config-pattern-not-a-regex", _config("src-qwen2", lambda c: c.update(rank_pattern={"q_proj(": 2})),
         ("field rank_pattern", "not a valid pattern")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_clearly_and_harms_nothing(case: Case, zoo, tmp_path, capsys):
    ws = Workspace(tmp_path, zoo)
    argv = case.setup(ws)
    capsys.readouterr()
    before = tree_state(tmp_path, *(p for p in zoo.values()))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err, err
    for text in case.expect:
        assert text.replace("{ws}", str(tmp_path)) in err, f"{text!r} not in {err!r}"
    after = tree_state(tmp_path, *(p for p in zoo.values()))
    assert {k: v for k, v in after.items() if k in before} == before, "an input changed"
    assert set(after) == set(before), f"left behind or deleted: {set(after) ^ set(before)}"


def test_corpus_is_large_and_distinct():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
