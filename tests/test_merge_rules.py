"""`ggraft merge` as mergekit's configs merge, one rule per test, each against numpy: gradients
and filters (mergekit's ``evaluate_setting``), SLERP (mergekit's ``slerp``), ``slices`` with
``layer_range``, ``passthrough`` stacking (HF and GGUF), sibling GGUF architectures with
``metadata_source``, and mergekit's modular form (``modules:``) on HF VLMs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from conftest import assert_one_line_error, run_cli
from ggraft.errors import InputError
from ggraft.gguf_io import gguf_file
from ggraft.jobs.merge import merge, parse_config
from ggraft.jobs.merge.methods import METHODS, ArrayRows, Contribution
from ggraft.jobs.merge.naming import GgufNaming
from ggraft.jobs.merge.parameters import Condition, evaluate, filter_matches

ATTN_T, MLP_T = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0]
#: the configs people publish (mergekit's README, and model cards on the hub)
PUBLISHED_T = [{"filter": "self_attn", "value": ATTN_T}, {"filter": "mlp", "value": MLP_T}, {"value": 0.5}]


# -- numpy references, written from mergekit's code ------------------------------------------

def mergekit_gradient(values, t):
    """mergekit/config.py evaluate_setting for a list of numbers."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def mergekit_slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """mergekit/merge_methods/slerp.py slerp (whole tensors), in float64."""
    v0, v1 = v0.astype(np.float64), v1.astype(np.float64)
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    dot = np.sum((v0 / n0 if n0 > eps else v0) * (v1 / n1 if n1 > eps else v1))
    if abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta0 = np.arccos(dot)
    return np.sin(theta0 - theta0 * t) / np.sin(theta0) * v0 + np.sin(theta0 * t) / np.sin(theta0) * v1


def published_t(hf_name: str, t: float) -> float:
    """The t the published config gives a tensor (first matching filter wins)."""
    if "self_attn" in hf_name:
        return mergekit_gradient(ATTN_T, t)
    if "mlp" in hf_name:
        return mergekit_gradient(MLP_T, t)
    return 0.5


def write(folder: Path, data: dict, name: str = "merge.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    from fixtures import common

    return common.saved_tensors(folder)


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf_file.open_gguf(path)
    return {t.name: gguf_file.tensor_values(reader, t.name) for t in reader.tensors}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Three 4-layer models (HF folder, GGUF) of distinct random weights."""
    from fixtures.merge_models import layered_model

    folder = tmp_path_factory.mktemp("layered")
    return {name: layered_model(folder, name, seed) for seed, name in enumerate(("a", "b", "c"))}


# -- parameters: gradients and filters ------------------------------------------------------

def test_gradient_is_interpolated_across_layers_as_mergekit_does():
    for n in (1, 2, 5, 7, 24):
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            assert evaluate(tuple(ATTN_T), "x", t) == pytest.approx(mergekit_gradient(ATTN_T, t))
    assert evaluate((0.2,), "x", 0.7) == 0.2
    conditions = (Condition("self_attn", tuple(ATTN_T)), Condition("mlp", tuple(MLP_T)), Condition(None, 0.5))
    assert evaluate(conditions, "model.layers.3.mlp.up_proj.weight", 0.25) == mergekit_gradient(MLP_T, 0.25)
    assert evaluate(conditions, "model.layers.3.input_layernorm.weight", 0.25) == 0.5
    assert evaluate(conditions[:2], "model.norm.weight", 0.0) is None  # no filter matches: the next level decides
    assert filter_matches("*self_attn*", "model.layers.0.self_attn.q_proj.weight")  # globs, as mergekit's
    assert not filter_matches("*self_attn*", "model.layers.0.linear_attn.A_log")
    assert filter_matches("attn", "model.layers.0.linear_attn.A_log")  # a plain filter is a substring


def test_filters_are_matched_on_gguf_names_translated_with_gguf_py():
    naming = GgufNaming("llama", 4)
    assert naming.hf_name("blk.2.attn_q.weight") == "model.layers.2.self_attn.q_proj.weight"
    assert naming.hf_name("blk.2.attn_output.weight") == "model.layers.2.self_attn.o_proj.weight"
    assert naming.hf_name("blk.2.ffn_up.weight") == "model.layers.2.mlp.up_proj.weight"
    assert naming.hf_name("blk.2.attn_norm.weight") == "model.layers.2.input_layernorm.weight"
    assert naming.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert naming.hf_name("output.weight") == "lm_head.weight"


# -- SLERP ----------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_elements", [7, 1 << 18])
def test_slerp_normalizes_whole_tensors_and_falls_back_to_lerp_when_parallel(chunk_elements):
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((9, 6)).astype(np.float32) for _ in range(2))
    slerp = METHODS["slerp"]

    def run(t, base, other):
        chunks = slerp.merge("w", ArrayRows(base), [Contribution(ArrayRows(other))], slerp.settings({"t": t}),
                             chunk_elements)
        return np.concatenate(list(chunks)).reshape(base.shape)

    for t in (0.0, 0.3, 0.5, 1.0):
        np.testing.assert_allclose(run(t, a, b), mergekit_slerp(t, a, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(run(0.0, a, b), a)  # base_model is the t = 0 end
    nearly = 3 * a + np.float32(1e-4) * b  # |cos| > 0.9995: linear interpolation
    np.testing.assert_allclose(run(0.3, a, nearly), 0.7 * a + 0.3 * nearly, rtol=1e-6)
    zeros = np.zeros_like(a)  # a norm under eps is not divided by (mergekit's normalize)
    np.testing.assert_allclose(run(0.25, zeros, b), mergekit_slerp(0.25, zeros, b), rtol=1e-5, atol=1e-6)


def test_published_gradient_slerp_config_on_hf_and_gguf(stacks, tmp_path):
    """The config of the model cards (slices, slerp, t per filter as gradients) on HF folders and
    on GGUF: every tensor is mergekit's slerp at its filter's t for its layer; both kinds agree."""
    (a, a_gguf), (b, b_gguf) = stacks["a"], stacks["b"]
    for kind, (x, y, out) in {"hf": (a, b, tmp_path / "hf-out"), "gguf": (a_gguf, b_gguf, tmp_path / "out.gguf")}.items():
        cfg = write(tmp_path, {"slices": [{"sources": [{"model": str(x), "layer_range": [0, 4]},
                                                       {"model": str(y), "layer_range": [0, 4]}]}],
                               "merge_method": "slerp", "base_model": str(x), "parameters": {"t": PUBLISHED_T},
                               "dtype": "float32"}, f"{kind}.yaml")
        merge(cfg, out, outtype="f32", chunk_elements=100)
    va, vb, hf_out = hf_tensors(a), hf_tensors(b), hf_tensors(tmp_path / "hf-out")
    for name in va:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = layer / 3 if layer is not None else (0.0 if "embed" in name else 1.0)
        expected = mergekit_slerp(published_t(name, t), va[name], vb[name])
        np.testing.assert_allclose(hf_out[name], expected, rtol=1e-5, atol=1e-5, err_msg=name)
    naming, gguf_out = GgufNaming("llama", 4), gguf_tensors(tmp_path / "out.gguf")
    assert len(gguf_out) == len(va)
    for name, value in gguf_out.items():
        np.testing.assert_allclose(value, hf_out[naming.hf_name(name)], rtol=1e-5, atol=1e-5, err_msg=name)


# -- slices -----------------------------------------------------------------------------------

def test_slices_merge_the_layers_their_sources_cover(stacks, tmp_path):
    """Output layer k of a slice is made of each source's layer first + k; a density gradient is
    evaluated at k / (n - 1) within the slice; the embedding comes from the first slice (t = 0)
    and the head from the last (t = 1)."""
    (a, _), (b, _), (c, _) = stacks["a"], stacks["b"], stacks["c"]
    cfg = write(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(a), "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]},
                     {"model": str(b), "layer_range": [2, 4], "parameters": {"weight": [0.2, 0.8]}}]},
        {"sources": [{"model": str(a), "layer_range": [2, 4]},
                     {"model": str(c), "layer_range": [0, 2], "parameters": {"weight": 0.5}}]}],
        "parameters": {"lambda": 0.9}})
    merge(cfg, tmp_path / "out", outtype="f32")
    va, vb, vc, out = (hf_tensors(p) for p in (a, b, c, tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    for k, (base_layer, other, other_layer, weight) in enumerate(
            [(0, vb, 2, 0.2), (1, vb, 3, 0.8), (2, vc, 0, 0.5), (3, vc, 1, 0.5)]):
        for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            base = va[f"model.layers.{base_layer}.{rest}"]
            expected = base + 0.9 * weight * (other[f"model.layers.{other_layer}.{rest}"] - base)
            np.testing.assert_allclose(out[f"model.layers.{k}.{rest}"], expected, rtol=1e-5, atol=1e-6)
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    np.testing.assert_allclose(out[embed], va[embed] + 0.9 * 0.2 * (vb[embed] - va[embed]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[head], va[head] + 0.9 * 0.5 * (vc[head] - va[head]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, slices, needle", [
    ("linear", [[("A", [0, 2]), ("B", [0, 3])]], "all sources of a slice must have the same number of layers, not [2, 3]"),
    ("linear", [[("A", [2, 2])]], "layer_range must be [first, stop] with 0 <= first < stop, not [2, 2]"),
    ("linear", [[("A", [3, 6]), ("B", [0, 3])]], "{A} has no layer 4"),
    ("slerp", [[("B", [0, 2]), ("C", [0, 2])]], "slerp needs the base model {A!r} among the slice's sources"),
])
def test_slices_that_do_not_line_up_are_refused(stacks, tmp_path, method, slices, needle):
    refs = {k: str(stacks[k.lower()][0]) for k in ("A", "B", "C")}
    data = {"merge_method": method, "slices": [{"sources": [{"model": refs[m], "layer_range": r} for m, r in sl]}
                                               for sl in slices],
            "parameters": {"weight": 1.0} if method == "linear" else {"t": 0.5}}
    if method == "slerp":
        data["base_model"] = refs["A"]
    res = run_cli("merge", write(tmp_path, data), "-o", tmp_path / "out")
    assert_one_line_error(res, needle.format(**refs))
    assert not (tmp_path / "out").exists()


# -- passthrough: stacking layers ---------------------------------------------------------------

def test_passthrough_stacks_gguf_layers_renumbers_and_rewrites_per_layer_metadata(stacks, tmp_path):
    (a, a_gguf), (b, b_gguf) = stacks["a"], stacks["b"]
    cfg = write(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a_gguf), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b_gguf), "layer_range": [1, 4]}]}]})
    merge(cfg, tmp_path / "deep.gguf", outtype="f32")
    out, ta, tb = (gguf_tensors(p) for p in (tmp_path / "deep.gguf", a_gguf, b_gguf))
    origin = [(ta, 0), (ta, 1), (ta, 2), (tb, 1), (tb, 2), (tb, 3)]
    for k, (source, layer) in enumerate(origin):
        for rest in ("attn_q.weight", "ffn_up.weight", "attn_norm.weight"):
            np.testing.assert_array_equal(out[f"blk.{k}.{rest}"], source[f"blk.{layer}.{rest}"])
    np.testing.assert_array_equal(out["token_embd.weight"], ta["token_embd.weight"])  # first slice's
    np.testing.assert_array_equal(out["output.weight"], tb["output.weight"])  # last slice's
    reader, ra, rb = (gguf_file.scan_gguf(p) for p in (tmp_path / "deep.gguf", a_gguf, b_gguf))
    assert reader.value("llama.block_count") == 6 and len(out) == 3 + 6 * 9
    kv_a, kv_b = ra.value("llama.attention.head_count_kv"), rb.value("llama.attention.head_count_kv")
    assert reader.value("llama.attention.head_count_kv") == [kv_a[0], kv_a[1], kv_a[2], kv_b[1], kv_b[2], kv_b[3]]
    assert kv_a != kv_b[:4]


def test_passthrough_stacks_hf_layers_and_the_result_loads_in_llama_cpp_and_transformers(fx, stacks, tmp_path):
    (a, _), (b, _) = stacks["a"], stacks["b"]
    cfg = write(tmp_path, {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]})
    merge(cfg, tmp_path / "deep")
    out, va, vb = hf_tensors(tmp_path / "deep"), hf_tensors(a), hf_tensors(b)
    for k, (source, layer) in enumerate([(va, 0), (va, 1), (va, 2), (vb, 1), (vb, 2), (vb, 3)]):
        np.testing.assert_array_equal(out[f"model.layers.{k}.mlp.up_proj.weight"],
                                      source[f"model.layers.{layer}.mlp.up_proj.weight"])
    config, ca, cb = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "deep", a, b))
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == ca["layer_types"][:3] + cb["layer_types"][1:]

    # the tiny LLaVA's language model (2 layers) stacked to 3: transformers and llama.cpp run it
    import torch
    from transformers import LlamaForCausalLM

    from ggraft.pair import engine

    cfg = write(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fx / "base.gguf"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fx / "code.gguf"), "layer_range": [1, 2]}]}]}, "run.yaml")
    merge(cfg, tmp_path / "deep.gguf", outtype="f32")
    llm = engine.open_llama(tmp_path / "deep.gguf", n_ctx=32, verbose=False, n_threads=1)  # AMX-safe (test_amx)
    llm.eval([1, 17, 40])
    assert np.isfinite(np.asarray(llm.scores[:3])).all()
    cfg = write(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fx / "base"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fx / "code"), "layer_range": [1, 2]}]}]}, "run-hf.yaml")
    merge(cfg, tmp_path / "deep-hf")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "deep-hf", dtype=torch.float32)
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3


@pytest.fixture(scope="module")
def fx() -> Path:
    from fixtures import merge_models

    return merge_models.build()


# -- sibling architectures in GGUF ------------------------------------------------------------------

@pytest.fixture(scope="module")
def vx() -> Path:
    from fixtures import viscodex

    return viscodex.build()


def viscodex_gguf_config(vx: Path, folder: Path, vlm: Path | None = None, **top) -> Path:
    vlm = vlm or vx / "vlm.gguf"
    return write(folder, {"merge_method": "task_arithmetic", "base_model": str(vx / "base.gguf"),
                          "models": [{"model": str(vlm), "parameters": {"weight": 0.7}},
                                     {"model": str(vx / "code.gguf"), "parameters": {"weight": 0.3}}],
                          "parameters": {"lambda": 1.0, "normalize": False}, **top}, "sibling.yaml")


def test_sibling_architectures_need_the_metadata_source(vx, tmp_path):
    res = run_cli("merge", viscodex_gguf_config(vx, tmp_path), "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, "architecture 'qwen2vl' differs from", "'qwen2'", "metadata_source")
    assert not (tmp_path / "out.gguf").exists()

    cfg = viscodex_gguf_config(vx, tmp_path, metadata_source=str(vx / "vlm.gguf"))
    result = merge(cfg, tmp_path / "out.gguf", outtype="f32")
    out, vlm = gguf_file.scan_gguf(tmp_path / "out.gguf"), gguf_file.scan_gguf(vx / "vlm.gguf")
    assert out.value("general.architecture") == "qwen2vl"
    assert out.value("qwen2vl.rope.dimension_sections") == vlm.value("qwen2vl.rope.dimension_sections") == [4, 4, 4, 0]
    for key in ("tokenizer.ggml.tokens", "tokenizer.chat_template", "general.name", "qwen2vl.block_count"):
        assert out.value(key) == vlm.value(key), key
    assert json.loads(out.value("ggraft.merge_config"))["metadata_source"] == str(vx / "vlm.gguf")
    b, v, c, m = (gguf_tensors(p) for p in (vx / "base.gguf", vx / "vlm.gguf", vx / "code.gguf", tmp_path / "out.gguf"))
    assert result.tensors == len(m) == len(v)
    for name in v:
        np.testing.assert_allclose(m[name], b[name] + 0.7 * (v[name] - b[name]) + 0.3 * (c[name] - b[name]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


def copy_gguf(src: Path, dest: Path, add: dict[str, np.ndarray] | None = None) -> Path:
    """``src`` re-written with extra tensors."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dest, reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, value in (add or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return dest


def test_sibling_tensors_only_the_metadata_source_has_are_copied_others_refused(vx, tmp_path):
    rope = np.linspace(1, 2, 12, dtype=np.float32)
    vlm = copy_gguf(vx / "vlm.gguf", tmp_path / "vlm-rope.gguf", {"rope_freqs.weight": rope})
    merge(viscodex_gguf_config(vx, tmp_path, vlm, metadata_source=str(vlm)), tmp_path / "out.gguf", outtype="f32")
    np.testing.assert_array_equal(gguf_tensors(tmp_path / "out.gguf")["rope_freqs.weight"], rope)

    code = copy_gguf(vx / "code.gguf", tmp_path / "code-extra.gguf", {"rope_freqs.weight": rope})
    cfg = write(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(vx / "base.gguf"),
                           "metadata_source": str(vx / "vlm.gguf"),
                           "models": [{"model": str(vx / "vlm.gguf"), "parameters": {"weight": 0.7}},
                                      {"model": str(code), "parameters": {"weight": 0.3}}]}, "extra.yaml")
    res = run_cli("merge", cfg, "-o", tmp_path / "bad.gguf")
    assert_one_line_error(res, "code-extra.gguf: has tensor 'rope_freqs.weight', which", "vlm.gguf lacks")
    assert not (tmp_path / "bad.gguf").exists()


# -- mergekit's modular form on HF VLMs ----------------------------------------------------------

def perturbed_vlm(src: Path, dest: Path, seed: int, rename=lambda k: k, extra: dict | None = None) -> Path:
    """A copy of a VLM folder with every tensor moved a little (another fine-tune), renamed."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {rename(k): v + (rng.standard_normal(v.shape) * 0.01).astype(v.dtype) for k, v in hf_tensors(src).items()}
    dest.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, dest / f.name)
    save_file({**tensors, **(extra or {})}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_mergekit_modular_config_merges_each_module_on_its_own(llava_fixture, tmp_path):
    """A config in mergekit's modular form (global method, each module with its models and
    parameters), runs unchanged: module boundaries from the LLaVA converter, layouts aligned."""
    from fixtures.merge_models import V5_LAYOUT

    a = llava_fixture / "hf"
    b = perturbed_vlm(a, tmp_path / "vlm-b", 1, lambda k: next((new + k[len(old):] for old, new in V5_LAYOUT
                                                                if k.startswith(old)), k))
    cfg = write(tmp_path, {"merge_method": "linear", "modules": {
        "text_decoder": {"models": [{"model": str(a), "parameters": {"weight": 0.3}},
                                    {"model": str(b), "parameters": {"weight": 0.7}}]},
        "vision_tower": {"models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                    {"model": str(b), "parameters": {"weight": 1.0}}]},
        "multi_modal_projector": {"models": [{"model": str(a), "parameters": {"weight": 1.0}}]}},
        "dtype": "float32"})
    result = merge(cfg, tmp_path / "out")
    assert result.warnings == []
    va, vb, out = hf_tensors(a), hf_tensors(b), hf_tensors(tmp_path / "out")
    assert sorted(out) == sorted(va)  # the first VLM's layout
    for name in va:
        other = vb[next(new + name[len(old):] for old, new in V5_LAYOUT if name.startswith(old))]
        if name.startswith("language_model."):
            expected = 0.3 * va[name] + 0.7 * other
        elif name.startswith("vision_tower."):
            expected = (va[name] + other) / 2
        else:
            expected = va[name]
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)


def test_modular_merge_accounts_for_every_tensor_or_refuses(llava_fixture, fx, tmp_path):
    a = llava_fixture / "hf"
    stray = perturbed_vlm(a, tmp_path / "stray", 2, extra={"mm_head.bias": np.zeros(3, np.float32)})
    text_only = {"merge_method": "linear", "modules": {"text_decoder": {"models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(stray), "parameters": {"weight": 0.5}}]}}}
    res = run_cli("merge", write(tmp_path, text_only), "-o", tmp_path / "out")
    assert_one_line_error(res, "stray: tensor 'mm_head.bias' belongs to no module")
    assert not (tmp_path / "out").exists()

    # modules not listed are filled from the metadata source (a warning names it when the config does not)
    ok = {**text_only, "modules": {"text_decoder": {"models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(fx / "code"), "parameters": {"weight": 0.5}}]}}}
    result = merge(write(tmp_path, ok, "fill.yaml"), tmp_path / "filled")
    assert any("vision_tower, multi_modal_projector are not listed: copied from" in w for w in result.warnings)
    va, out = hf_tensors(a), hf_tensors(tmp_path / "filled")
    for name in va:
        if not name.startswith("language_model."):
            assert out[name].tobytes() == va[name].tobytes(), name

    bad = {"merge_method": "linear", "modules": {"vision_tower": {"models": [
        {"model": str(a), "parameters": {"weight": 1}}, {"model": str(fx / "code"), "parameters": {"weight": 1}}]}}}
    assert_one_line_error(run_cli("merge", write(tmp_path, bad, "bad.yaml"), "-o", tmp_path / "x"),
                          "modules.vision_tower:", "has no vision_tower tensors")


def test_gradients_run_across_the_vision_towers_blocks(llava_fixture, tmp_path):
    """A gradient over the vision tower: block k of n at k/(n-1), numbered as the converter names
    the blocks for llama.cpp (v.blk.k); the patch, position and class embeddings and the pre-norm
    at 0, the post-norm and the projector at 1 (mergekit's pre and post weights)."""
    a = llava_fixture / "hf"
    b = perturbed_vlm(a, tmp_path / "vlm-b", 4)
    grad = [0.2, 0.8]
    cfg = {"merge_method": "linear", "modules": {m: {"models": [
        {"model": str(a), "parameters": {"weight": grad}}, {"model": str(b), "parameters": {"weight": 1.0}}]}
        for m in ("vision_tower", "multi_modal_projector")}, "dtype": "float32"}
    merge(write(tmp_path, cfg), tmp_path / "out")
    va, vb, out = hf_tensors(a), hf_tensors(b), hf_tensors(tmp_path / "out")
    blocks = {int(n.split(".layers.")[1].split(".")[0]) for n in va if ".encoder.layers." in n}
    for name in va:
        if name.startswith("language_model."):
            continue
        if ".encoder.layers." in name:
            t = int(name.split(".layers.")[1].split(".")[0]) / (len(blocks) - 1)
        else:
            t = 0.0 if ("embeddings" in name or "pre_layrnorm" in name) else 1.0
        w = mergekit_gradient(grad, t)
        np.testing.assert_allclose(out[name], (w * va[name] + vb[name]) / (w + 1), rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("text, needle", [
    ("merge_method: linear\nmodules: {audio_tower: {models: [a]}}", "unknown module 'audio_tower'"),
    ("merge_method: linear\nmodules: {vision_tower: {slices: [{sources: [{model: a, layer_range: [0, 1]}]}]}}",
     "slices stack the text decoder's layers"),
    ("merge_method: linear\nmodules: {text_decoder: {models: [a], slices: [x]}}", "give exactly one of 'models' or"),
    ("merge_method: slerp\nbase_model: a\nmodels: [a, b, c]\nparameters: {t: 0.5}", "slerp takes the base model and one"),
    ("merge_method: passthrough\nmodels: [a, b]", "passthrough takes 1 model per slice"),
    ("merge_method: slerp\nbase_model: a\nmodels: [a, b]", "slerp needs parameters: {t: ...}"),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: {filter: mlp}}}]",
     "a conditional value needs 'value'"),
    ("merge_method: linear\nmodels: [a]\nparameters: {weight: 1}\nmetadata_source: z", "metadata_source 'z' is not"),
])
def test_modular_and_slice_config_messages(text, needle):
    with pytest.raises(InputError) as e:
        parse_config(text, "c.yaml")
    assert needle in e.value.message and "\n" not in e.value.message


def test_slerp_without_t_is_refused_when_planned(fx, tmp_path):
    cfg = write(tmp_path, {"merge_method": "slerp", "base_model": str(fx / "base.gguf"),
                           "models": [{"model": str(fx / "base.gguf")}, {"model": str(fx / "code.gguf")}],
                           "parameters": {"t": [{"filter": "self_attn", "value": 0.2}]}})
    res = run_cli("merge", cfg, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, "no t for tensor 'output.weight' (no filter matches it)")


def test_passthrough_stacks_a_vlms_text_decoder_in_the_modular_form(llava_fixture, tmp_path):
    """The text decoder's slices restack the layers of a VLM's language model (its text_config
    follows); the vision side is filled from the VLM; transformers loads the result."""
    import torch
    from transformers import LlavaForConditionalGeneration

    vlm = llava_fixture / "hf"
    cfg = write(tmp_path, {"merge_method": "passthrough", "modules": {"text_decoder": {"slices": [
        {"sources": [{"model": str(vlm), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(vlm), "layer_range": [1, 2]}]}]}}, "metadata_source": str(vlm)})
    result = merge(cfg, tmp_path / "deep")
    assert result.warnings == []
    out, original = hf_tensors(tmp_path / "deep"), hf_tensors(vlm)
    lm = "language_model.model.layers."
    np.testing.assert_array_equal(out[lm + "2.mlp.up_proj.weight"], original[lm + "1.mlp.up_proj.weight"])
    assert all(out[k].tobytes() == v.tobytes() for k, v in original.items() if not k.startswith(lm))
    assert json.loads((tmp_path / "deep" / "config.json").read_text())["text_config"]["num_hidden_layers"] == 3
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "deep", dtype=torch.float32)
    assert len(model.model.language_model.layers) == 3


# -- VLM configs from mergekit's own examples/ (vlm-linear.yml, vlm-ties.yml), only paths changed --

MERGEKIT_VLM_LINEAR = """models:
  - model: {instruct}
  # - model: microsoft/Florence-2-base
    parameters:
      weight: 1.0
  - model: {captioner}
  # - model: maxiw/Florence-2-ScreenQA-base
    parameters:
      weight: 1.0
merge_method: linear
dtype: float32
"""
MERGEKIT_VLM_TIES = """models:
  # - model: impactframes/Qwen2-VL-7B-Captioner
  - model: {captioner}
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  # - model: Qwen/Qwen2-VL-7B-Instruct
  - model: {instruct}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
merge_method: ties
# base_model: Qwen/Qwen2-VL-7B-Instruct
base_model: {instruct}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


@pytest.fixture(scope="module")
def qwen2vl_pair(tmp_path_factory):
    """A tiny Qwen2-VL (the "Instruct") and a fine-tuned copy (the "Captioner") of it."""
    from fixtures import qwen2vl

    instruct = qwen2vl.build_qwen2() / "hf"
    return instruct, perturbed_vlm(instruct, tmp_path_factory.mktemp("vlm") / "captioner", 3)


def test_mergekit_vlm_linear_example_runs_unchanged(qwen2vl_pair, tmp_path):
    instruct, captioner = qwen2vl_pair
    cfg = tmp_path / "vlm-linear.yml"
    cfg.write_text(MERGEKIT_VLM_LINEAR.format(instruct=instruct, captioner=captioner))
    res = run_cli("merge", cfg, "-o", tmp_path / "out")
    assert res.code == 0, res.stderr
    a, b, out = hf_tensors(instruct), hf_tensors(captioner), hf_tensors(tmp_path / "out")
    assert sorted(out) == sorted(a)  # every tensor: language model, vision tower and merger alike
    for name in a:
        np.testing.assert_allclose(out[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7, err_msg=name)


def test_mergekit_vlm_ties_example_runs_unchanged(qwen2vl_pair, tmp_path):
    """Gradients of density and weight across the layers of each module, TIES on the whole VLM
    (the numbers of each rule are checked against numpy above); int8_mask has no effect here."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    instruct, captioner = qwen2vl_pair
    cfg = tmp_path / "vlm-ties.yml"
    cfg.write_text(MERGEKIT_VLM_TIES.format(instruct=instruct, captioner=captioner))
    res = run_cli("merge", cfg, "-o", tmp_path / "out")
    assert res.code == 0, res.stderr
    a, b, out = hf_tensors(instruct), hf_tensors(captioner), hf_tensors(tmp_path / "out")
    assert sorted(out) == sorted(a) and all(v.dtype == np.float16 for v in out.values())
    moved = [n for n in a if not np.array_equal(out[n].astype(np.float32), a[n].astype(np.float16).astype(np.float32))]
    assert any(n.startswith("visual.blocks.") for n in moved) and any(n.startswith("visual.merger.") for n in moved)
    assert any(n.startswith("model.layers.") for n in moved)  # mergekit's models: every module merged
    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())
