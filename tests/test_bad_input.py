"""Bad input: a clear error naming the file and the key, and nothing left where the output goes."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetero_ray.errors import AdapterError, FamilyError, HeteroRayError, SpecError
from hetero_ray.io.adapters import WEIGHTS_NAME, read_adapter
from hetero_ray.runners.local import fuse_local
from hetero_ray.runners.prepare import alignment_plan, candidates_of, open_source, open_target
from hetero_ray.spec import load_spec
from hetero_ray.tokens.candidates import candidates_from_arrow, candidates_to_arrow
from tests.helpers import make_spec


def _copy(zoo, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(zoo[name], dst)
    return dst


def _rewrite(adapter_dir, fn):
    path = adapter_dir / WEIGHTS_NAME
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _fails(zoo, tmp_path, source_dir, match, exc=AdapterError, **kw):
    spec = make_spec(zoo, tmp_path / "out", **kw)
    spec = spec.model_copy(update={"sources": [spec.sources[0].model_copy(update={"adapter": source_dir})]})
    with pytest.raises(exc, match=match):
        fuse_local(spec)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_corrupt_safetensors(zoo, tmp_path):
    bad = _copy(zoo, "qwen2-lora", tmp_path)
    (bad / WEIGHTS_NAME).write_bytes(b"\x00\x01garbage" * 10)
    _fails(zoo, tmp_path, bad, rf"{bad}/{WEIGHTS_NAME}: not a valid safetensors file")


def test_nan_and_inf_tensors(zoo, tmp_path):
    bad = _copy(zoo, "qwen2-lora", tmp_path)
    key = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    _rewrite(bad, lambda t: t[key].view(-1).__setitem__(3, float("nan")))
    _fails(zoo, tmp_path, bad, rf"{WEIGHTS_NAME} \[{key}\]: 1 non-finite values")


def test_missing_lora_partner(zoo, tmp_path):
    bad = _copy(zoo, "qwen2-lora", tmp_path)
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    _rewrite(bad, lambda t: t.pop(key))
    _fails(zoo, tmp_path, bad, r"\[base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight\]: lora_A has no "
           "lora_B partner")


def test_unknown_family_override(zoo, tmp_path):
    spec = make_spec(zoo, tmp_path / "out")
    spec = spec.model_copy(update={"sources": [spec.sources[0].model_copy(update={"family": "falcon"})]})
    with pytest.raises(FamilyError, match="unknown family 'falcon'"):
        fuse_local(spec)
    assert not (tmp_path / "out").exists()


def test_pickled_adapter_refused_unless_opted_in(zoo, tmp_path):
    bad = _copy(zoo, "qwen2-lora", tmp_path)
    torch.save(load_file(str(bad / WEIGHTS_NAME)), bad / "adapter_model.bin")
    (bad / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=r"adapter_model.bin: pickled weights are refused.*allow_pickle"):
        read_adapter(bad)
    opened = read_adapter(bad, allow_pickle=True)
    safe = read_adapter(zoo["qwen2-lora"])
    assert opened.shapes == safe.shapes
    key = next(iter(safe.shapes))
    assert torch.equal(opened.tensor(key), safe.tensor(key))


def test_target_module_missing_in_base_model(zoo, tmp_path):
    bad = _copy(zoo, "llama-lora", tmp_path)
    old = "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"

    def rename(t):
        for ab in "AB":
            key = old.replace("lora_B", f"lora_{ab}")
            t[key.replace("layers.3", "layers.7")] = t.pop(key)

    _rewrite(bad, rename)
    spec = make_spec(zoo, tmp_path / "out", target={"base": str(zoo["llama-base"]), "adapter": str(bad)})
    # caught from the base's config.json, before any model is built
    with pytest.raises(AdapterError, match=r"layers.7.mlp.up_proj.lora_A.weight\]: module in layer 7, but "
                       r".*llama-base/config.json has num_hidden_layers 4"):
        fuse_local(spec)
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_nothing(zoo, tmp_path, monkeypatch):
    import hetero_ray.io.export as export

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_adapter", broken)
    spec = make_spec(zoo, tmp_path / "out", **{"training.max_steps": 1})
    with pytest.raises(HeteroRayError, match=rf"output: cannot write {tmp_path / 'out'}: disk full"):
        fuse_local(spec)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(zoo, tmp_path):
    (tmp_path / "out").mkdir()
    spec = make_spec(zoo, tmp_path / "out", **{"training.max_steps": 1})
    with pytest.raises(HeteroRayError, match="already exists"):
        fuse_local(spec)


def test_spec_errors_name_the_field(zoo, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"output: out\ntarget: {{base: {zoo['llama-base']}, adapter: {zoo['llama-lora']}}}\n"
        f"sources: [{{adapter: {zoo['qwen2-lora']}}}]\nreplay: [{{path: {zoo['replay']}}}]\n"
        "training: {epochs: 0, lr: fast}\nmethod: {blok_size: 4}\n"
    )
    with pytest.raises(SpecError) as err:
        load_spec(spec_file)
    msg = str(err.value)
    assert str(spec_file) in msg
    for field in ("training.epochs", "training.lr", "method.blok_size"):
        assert field in msg
    spec_file.write_text(
        f"output: out\ntarget: {{base: {zoo['llama-base']}, adapter: missing-dir}}\n"
        f"sources: [{{adapter: {zoo['qwen2-lora']}}}]\nreplay: [{{path: {zoo['replay']}}}]\n"
    )
    with pytest.raises(SpecError, match=r"target.adapter: .*missing-dir does not exist"):
        load_spec(spec_file)


def _candidates(zoo, tmp_path) -> list:
    spec = make_spec(zoo, tmp_path / "o")
    _, ttopo = open_target(spec)
    srcs = [open_source(spec, i) for i in range(3)]
    plan = alignment_plan(spec, ttopo, [t for _, t in srcs])
    return [c for i, (a, t) in enumerate(srcs) for c in candidates_of(spec, plan, i, a, t, 64)]


def test_candidates_round_trip_through_arrow_exactly(zoo, tmp_path):
    cands = _candidates(zoo, tmp_path)
    back = candidates_from_arrow(candidates_to_arrow(cands))
    assert len(back) == len(cands) > 0
    for x, y in zip(cands, back, strict=True):
        assert (x.group, x.target_module, x.source_id, x.source_layer, x.n_a_blocks) == (
            y.group, y.target_module, y.source_id, y.source_layer, y.n_a_blocks)
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.a, y.a) and torch.equal(x.b, y.b)
        assert x.scale == y.scale
    table = candidates_to_arrow(cands)  # a slice of the table (as a Ray Data batch can be) reads its own rows
    part = candidates_from_arrow(table.slice(2, 3))
    assert [c.key for c in part] == [c.key for c in cands[2:5]]
    assert all(torch.equal(x.a, y.a) and torch.equal(x.b, y.b) for x, y in zip(part, cands[2:5], strict=True))


def test_candidates_from_arrow_are_views_of_the_tables_buffers(zoo, tmp_path):
    """No copy on the way in (a worker would hold every token twice while it builds its groups): each
    candidate's factors lie inside the Arrow buffer they came from."""
    table = candidates_to_arrow(_candidates(zoo, tmp_path))
    back = candidates_from_arrow(table)
    values = table.column("factors").chunk(0).values.buffers()[1]
    for c in back:
        for t in (c.a, c.b):
            assert values.address <= t.data_ptr() and t.data_ptr() + t.nbytes <= values.address + values.size


def test_one_check_of_the_whole_file_spares_each_read_its_own_and_still_names_a_bad_key(zoo, tmp_path, monkeypatch):
    """A reader of every module checks the file once (one sum over its tensors' bytes); reads then skip their
    own check. A NaN anywhere, or tensors of two dtypes, leave each read checked: the error names the key.
    The verdict stays in the process that made it (a pickled adapter checks again)."""
    import pickle

    from hetero_ray.io import adapters

    clean = read_adapter(_copy(zoo, "qwen2-lora", tmp_path))
    clean.check_finite()
    assert clean._handle.finite
    assert pickle.loads(pickle.dumps(clean))._handle is None  # another process maps and checks for itself
    monkeypatch.setattr(adapters, "_all_finite", lambda t: pytest.fail("a read checked again"))
    assert all(clean.tensor(k).isfinite().all() for k in clean.shapes)
    monkeypatch.undo()

    bad_dir = _copy(zoo, "qwen2-lora", tmp_path / "bad")
    key = "base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"
    _rewrite(bad_dir, lambda t: t[key].view(-1).__setitem__(3, float("nan")))
    bad = read_adapter(bad_dir)
    bad.check_finite()
    assert bad._handle.finite is False
    good_key = next(k for k in bad.shapes if k != key)
    assert bad.tensor(good_key).isfinite().all()
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME} \[{key}\]: 1 non-finite values"):
        bad.tensor(key)

    mixed_dir = _copy(zoo, "qwen2-lora", tmp_path / "mixed")
    _rewrite(mixed_dir, lambda t: t.__setitem__(key, t[key].half()))
    mixed = read_adapter(mixed_dir)
    mixed.check_finite()
    assert mixed._handle.finite is False  # two dtypes: no single sum, each read checked

    big_dir = _copy(zoo, "qwen2-lora", tmp_path / "big")  # fp16 whose sum overflows: each value decides
    _rewrite(big_dir, lambda t: t.update({k: torch.full_like(v, 60000.0).half() for k, v in t.items()}))
    big = read_adapter(big_dir)
    big.check_finite()
    assert big._handle.finite is True

    other_dir = _copy(zoo, "qwen2-lora", tmp_path / "other")  # a tensor that is no LoRA factor: not summed
    _rewrite(other_dir, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.ones(4, 4)))
    other = read_adapter(other_dir)
    other.check_finite()
    assert other.other_keys and other._handle is None


def test_reads_of_every_shape_and_float_dtype_equal_safetensors_own(tmp_path):
    """A read is one strided view of the map as its dtype: 0-d, 1-d, empty and 3-d tensors in bf16, fp16, fp32
    and fp64 all read as safetensors reads them (an unaligned offset: the test below)."""
    from hetero_ray.io.adapters import _MappedSafetensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a_scalar": torch.tensor(3.5, dtype=torch.float64),
        "b_vector": torch.randn(5, generator=gen).half(),
        "c_empty": torch.zeros(0, 3, dtype=torch.float32),
        "d_cube": torch.randn(2, 3, 4, generator=gen).bfloat16(),
        "e_matrix": torch.randn(3, 7, generator=gen).double(),
        "f_matrix": torch.randn(4, 2, generator=gen),
    }
    path = tmp_path / WEIGHTS_NAME
    save_file(tensors, str(path))
    want = load_file(str(path))
    mapped = _MappedSafetensors(path)
    for key, t in want.items():
        got = mapped.tensor(key)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), key
    assert mapped.check_all_finite() is False  # several dtypes: no single sum


def test_base_configs_are_built_once_per_distinct_config_and_each_caller_gets_its_own_copy(zoo):
    import json

    from hetero_ray.families import _with_defaults, config_defaults, with_defaults

    raw = json.loads((zoo["gemma3-base"] / "config.json").read_text())
    config_defaults.cache_clear()
    first = with_defaults(raw)
    assert first == _with_defaults(raw) and config_defaults.cache_info().misses == 1
    first["num_hidden_layers"] = -1
    if isinstance(first.get("text_config"), dict):
        first["text_config"]["num_hidden_layers"] = -1
    again = with_defaults(raw)
    assert config_defaults.cache_info().hits == 1 and again == _with_defaults(raw) and again is not first


def test_tensors_read_are_views_of_a_private_map_and_writes_never_reach_the_file(zoo, tmp_path):
    """A read copies nothing (the tensor is a view of the file's map), and an in-place write to it stays in
    this process: the file's bytes do not change, and a fresh read sees the original values."""
    src = _copy(zoo, "qwen2-lora", tmp_path)
    before = (src / WEIGHTS_NAME).read_bytes()
    adapter = read_adapter(src)
    key = next(iter(adapter.modules.values())).a_key
    t = adapter.tensor(key)
    assert t.untyped_storage().data_ptr() == adapter.tensor(next(iter(adapter.shapes))).untyped_storage().data_ptr()
    original = t.clone()
    t.add_(1.0)
    assert (src / WEIGHTS_NAME).read_bytes() == before
    assert torch.equal(read_adapter(src).tensor(key), original)


def test_unaligned_and_inconsistent_tensors_in_a_safetensors_file(tmp_path):
    """safetensors itself writes every tensor at an offset aligned to its dtype; a file that does not (an fp16
    tensor of odd length before an fp32 one) is read through safetensors instead, values intact; a header
    whose bytes do not hold its shape is refused naming file and key; an Inf in an fp16 file names its key."""
    import json
    import struct

    def write(path, tensors, fix_header=None):
        header, blobs, pos = {}, [], 0
        for name, t in tensors.items():
            raw = t.contiguous().view(torch.uint8).numpy().tobytes()
            header[name] = {"dtype": {torch.float16: "F16", torch.float32: "F32"}[t.dtype], "shape": list(t.shape),
                            "data_offsets": [pos, pos + len(raw)]}
            blobs.append(raw)
            pos += len(raw)
        if fix_header:
            fix_header(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))

    def adapter_dir(name, tensors, fix_header=None):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 3, "peft_type": "LORA"}))
        write(d / WEIGHTS_NAME, tensors, fix_header)
        return d

    a_key, b_key = ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    a, b = torch.randn(3, 5).half(), torch.randn(7, 3)  # 15 halves: 30 bytes, so B starts unaligned
    adapter = read_adapter(adapter_dir("unaligned", {a_key: a, b_key: b}))
    assert torch.equal(adapter.tensor(a_key), a) and torch.equal(adapter.tensor(b_key), b)

    def grow(header):  # B claims 7 x 3 floats in the bytes of 6 x 3
        header[b_key]["shape"] = [7, 3]

    with pytest.raises(AdapterError, match=WEIGHTS_NAME):  # safetensors' own check, when the adapter is opened
        read_adapter(adapter_dir("short", {a_key: torch.randn(3, 5), b_key: torch.randn(6, 3)}, grow))
    # the same file swapped in after opening and before the first read: the map's own check names the key
    opened = read_adapter(adapter_dir("swapped", {a_key: torch.randn(3, 5), b_key: torch.randn(7, 3)}))
    write(tmp_path / "swapped" / WEIGHTS_NAME, {a_key: torch.randn(3, 5), b_key: torch.randn(6, 3)}, grow)
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME} \[{b_key}\]: tensor bytes .* do not hold its F32 shape"):
        opened.tensor(b_key)
    write(tmp_path / "swapped" / WEIGHTS_NAME, {a_key: torch.randn(3, 5)})
    opened._handle = None  # mapped afresh, as a new process would
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME} \[{b_key}\]: no such tensor"):
        opened.tensor(b_key)
    inf = torch.randn(3, 5).half()
    inf[1, 2] = float("inf")
    bad = read_adapter(adapter_dir("inf", {a_key: inf, b_key: torch.randn(7, 3).half()}))
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME} \[{a_key}\]: 1 non-finite"):
        bad.tensor(a_key)
