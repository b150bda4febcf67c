"""`ggraft merge`: each method against a hand-computed numpy result, GGUF-in/GGUF-out (Q8_0
inputs, run in llama.cpp), HF VLM + plain LLM merges that `ggraft convert` and `verify` take,
mismatches named, config validation messages and CLI exit codes."""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml

from conftest import assert_one_line_error, run_cli
from ggraft.gguf_io import gguf_file, numeric
from ggraft.errors import InputError
from ggraft.jobs.merge import merge, parse_config
from ggraft.jobs.merge.methods import METHODS, ArrayRows, Contribution
from ggraft.jobs.merge.plan import plan_tensors
from ggraft.jobs.merge.stream import merged_rows, tensor_merge

ROOT = Path(__file__).resolve().parent.parent
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def fx() -> Path:
    from fixtures import merge_models

    return merge_models.build()


def write_config(folder: Path, method: str, models: list[tuple[Path, dict]], base: Path | None = None,
                 name: str = "merge.yaml", **top) -> Path:
    data = {"merge_method": method, "models": [{"model": str(p), **({"parameters": pr} if pr else {})}
                                               for p, pr in models]}
    if base is not None:
        data["base_model"] = str(base)
    data.update(top)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_method(name: str, base, models, chunk_elements=1 << 18, **settings) -> np.ndarray:
    method = METHODS[name]
    if "lam" in settings:
        settings["lambda"] = settings.pop("lam")
    s = method.settings(settings, settings.pop("seed", 0))
    contributions = [Contribution(ArrayRows(x), w, d) for x, w, d in models]
    chunks = method.merge("t", ArrayRows(base) if base is not None else None, contributions, s, chunk_elements)
    return np.concatenate(list(chunks)).reshape(np.shape(models[0][0]))


# -- methods against numpy --------------------------------------------------------------------

B = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)
D1 = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
D2 = np.array([[-3.0, 1.0, 0.25, -1.0]], np.float32)


def test_linear_weighted_average():
    x1, x2 = B + D1, B + D2
    np.testing.assert_allclose(run_method("linear", None, [(x1, 1.0, 1), (x2, 3.0, 1)]), (x1 + 3 * x2) / 4)
    np.testing.assert_allclose(run_method("linear", None, [(x1, 1.0, 1), (x2, 3.0, 1)], normalize=False), x1 + 3 * x2)


def test_task_arithmetic_adds_weighted_task_vectors():
    x1, x2 = B + D1, B + D2
    got = run_method("task_arithmetic", B, [(x1, 0.7, 1), (x2, 0.3, 1)], lam=0.5)
    np.testing.assert_allclose(got, B + 0.5 * (0.7 * D1 + 0.3 * D2), rtol=1e-6)
    got = run_method("task_arithmetic", B, [(x1, 2.0, 1), (x2, 2.0, 1)], normalize=True)
    np.testing.assert_allclose(got, B + (2 * D1 + 2 * D2) / 4, rtol=1e-6)


def test_ties_sign_consensus_by_hand():
    # Σδ = [-2, -1, .75, 2] -> majority [-, -, +, +]; disagreeing entries drop out of sum and divisor
    got = run_method("ties", B, [(B + D1, 1.0, 1.0), (B + D2, 1.0, 1.0)])
    np.testing.assert_allclose(got, B + np.array([[-3.0, -2.0, 0.75 / 2, 3.0]]), rtol=1e-6)
    # density 0.5 keeps |δ1| 3, 2 and |δ2| 3, 1: δ1' = [0,-2,0,3], δ2' = [-3,1,0,0]; Σ = [-3,-1,0,3]
    # -> majority [-, -, + (a tie is positive), +]; nothing survives in column 2 (divisor 0 -> 1)
    got = run_method("ties", B, [(B + D1, 1.0, 0.5), (B + D2, 1.0, 0.5)], lam=0.5)
    np.testing.assert_allclose(got, B + 0.5 * np.array([[-3.0, -2.0, 0.0, 3.0]]), rtol=1e-6)


def test_ties_weights_vote_and_negative_weights_flip_signs():
    # weighted deltas 2·δ1 and -1·δ2 = [2,-4,1,6] and [3,-1,-.25,1]; Σ = [5,-5,.75,7] -> all agree
    # except column 2 for model 2 (-.25 vs +): normalize divides by Σw over agreeing models
    got = run_method("ties", B, [(B + D1, 2.0, 1.0), (B + D2, -1.0, 1.0)])
    expected = np.array([[(2 + 3) / (2 - 1), (-4 - 1) / (2 - 1), 1 / 2, (6 + 1) / (2 - 1)]])
    np.testing.assert_allclose(got, B + expected, rtol=1e-6)


def test_ties_threshold_ties_broken_by_position_across_chunks():
    base = np.zeros((2, 2), np.float32)
    ones = np.ones((2, 2), np.float32)
    got = run_method("ties", base, [(ones, 1.0, 0.5)], chunk_elements=2)  # one row per chunk
    np.testing.assert_array_equal(got, [[1, 1], [0, 0]])


def reference_ties(base, models, lam=1.0, normalize=True, drop=None):
    """TIES/DARE over whole tensors, the way the papers (and mergekit) write it."""
    deltas = []
    for i, (x, w, d) in enumerate(models):
        delta = (x - base).astype(np.float64).reshape(-1)
        if drop is not None:
            delta = drop(i, delta, d)
        elif d < 1:
            k = int(d * delta.size)
            order = np.argsort(-np.abs(delta), kind="stable")
            kept = np.zeros_like(delta)
            kept[order[:k]] = delta[order[:k]]
            delta = kept
        deltas.append(w * delta)
    weights = np.array([w for _, w, _ in models])[:, None]
    stacked = np.stack(deltas)
    majority = np.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(stacked) == majority
    mixed = (stacked * agree).sum(0)
    divisor = (weights * agree).sum(0)
    divisor[divisor == 0] = 1
    mixed = mixed / divisor if normalize else mixed
    return (base.reshape(-1) + lam * mixed).reshape(base.shape)


def dare_drop(seed: int, tensor: str = "t", rescale: bool = True):
    def drop(i, delta, d):
        keep = np.random.default_rng([seed, i, zlib.crc32(tensor.encode())]).random(delta.size) < d
        return delta * keep / (d if rescale else 1.0)

    return drop


@pytest.mark.parametrize("chunk_elements", [5, 1 << 18])
def test_ties_and_dare_match_whole_tensor_reference(chunk_elements):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((13, 8)).astype(np.float32)
    models = [(base + rng.standard_normal(base.shape).astype(np.float32), w, d) for w, d in ((0.6, 0.4), (0.9, 0.7))]
    got = run_method("ties", base, models, chunk_elements, lam=0.8)
    np.testing.assert_allclose(got, reference_ties(base, models, lam=0.8), rtol=1e-5, atol=1e-6)

    got = run_method("dare_ties", base, models, chunk_elements, seed=42)
    np.testing.assert_allclose(got, reference_ties(base, models, normalize=False, drop=dare_drop(42)),
                               rtol=1e-5, atol=1e-6)

    got = run_method("dare_linear", base, models, chunk_elements, seed=42, rescale=False)
    drop = dare_drop(42, rescale=False)
    expected = base + sum(w * drop(i, (x - base).reshape(-1), d).reshape(base.shape)
                          for i, (x, w, d) in enumerate(models))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, run_method("dare_linear", base, models, chunk_elements, seed=43, rescale=False))


def test_embed_common_merges_shared_rows_and_keeps_the_reference_rest():
    ref = np.arange(10, dtype=np.float32).reshape(5, 2)
    small = np.ones((4, 2), np.float32) * 100
    plans = plan_tensors("ref", {"ref": {"emb": (5, 2)}, "small": {"emb": (4, 2)}}, ["emb"], embed_common=True)
    assert plans[0].shared_rows == 4
    merge = tensor_merge(METHODS["linear"], plans[0], ArrayRows(ref), None,
                         [Contribution(ArrayRows(ref), 1.0), Contribution(ArrayRows(small), 1.0)],
                         METHODS["linear"].settings({"normalize": True}))
    rows = merged_rows(merge)
    got = np.concatenate([chunk.copy() for chunk in rows])  # a chunk's buffer is reused for the next
    np.testing.assert_allclose(got[:4], (ref[:4] + small) / 2)
    np.testing.assert_array_equal(got[4], ref[4])
    with pytest.raises(InputError, match=r"tensor 'emb' is \[4, 2\] in small but \[5, 2\] in ref") as e:
        plan_tensors("ref", {"ref": {"emb": (5, 2)}, "small": {"emb": (4, 2)}}, ["emb"], embed_common=False)
    assert "--embed-common" in e.value.hint


@pytest.mark.parametrize("accelerated", [True, False])
def test_float16_conversions_equal_numpy(accelerated, monkeypatch):
    if not accelerated:
        monkeypatch.setattr(numeric, "_GGML", None)
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    singles = numeric.to_float32(halves)
    finite = ~np.isnan(singles)
    assert np.array_equal(np.isnan(singles), np.isnan(halves.astype(np.float32)))
    assert np.array_equal(singles[finite].view(np.uint32), halves[finite].astype(np.float32).view(np.uint32))
    rng = np.random.default_rng(0)
    edge = np.array([0.0, -0.0, 65504, 65520, 1e9, -1e9, 6e-8, 3e-8, 2.98e-8, np.inf, -np.inf], np.float32)
    values = np.concatenate([rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32), edge])
    values = values[~np.isnan(values)]
    with np.errstate(over="ignore"):
        assert np.array_equal(numeric.to_float16(values).view(np.uint16), values.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("accelerated", [True, False])
@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.BF16])
def test_ggml_quantization_writes_gguf_py_bytes(qtype, accelerated, monkeypatch):
    """numeric.quantize hands Q8_0 and BF16 to ggml's quantizer: the same bytes as gguf-py's
    numpy one (its fallback) for every finite input, also into a given array and in the lazy
    convert path."""
    assert numeric.ACCELERATED and qtype in numeric.GGML_QUANTIZED
    if not accelerated:
        monkeypatch.setattr(numeric, "_GGML", None)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, 256)) * rng.choice([1e-6, 0.02, 3, 1e4], (64, 1))).astype(np.float32)
    values[0, :40] = 0  # an all-zero block (scale 0)
    values[1, :] = 1e-30  # a scale that float16 flushes to zero
    values[2, 3::7] = -values[2, 3::7].round()  # halves and whole numbers: rounding ties
    values[3, :32] = np.float32(127.5) * np.arange(32) / 31
    expected = gguf.quants.quantize(values, qtype)
    assert np.array_equal(numeric.quantize(values, qtype), expected)
    out = np.empty(*numeric.encoded_layout(values.shape, qtype))
    assert numeric.quantize(values, qtype, out) is out and np.array_equal(out, expected)
    from gguf.lazy import LazyNumpyTensor
    from ggraft.gguf_io.output import convert_tensor
    lazy = convert_tensor(LazyNumpyTensor.from_eager(values), qtype)
    assert lazy.shape == expected.shape and np.array_equal(LazyNumpyTensor.to_eager(lazy), expected)


def test_ggml_quantization_refuses_partial_blocks_before_ggml_would_abort():
    with pytest.raises(ValueError, match="not a multiple of Q8_0 block size"):
        numeric.quantize(np.ones((2, 40), np.float32), gguf.GGMLQuantizationType.Q8_0)


# -- config validation ------------------------------------------------------------------------

@pytest.mark.parametrize("text, needle", [
    ("models: [a]", "'merge_method' is missing; choose one of linear, task_arithmetic, ties, dare_linear, dare_ties, "
                    "slerp, passthrough"),
    ("merge_method: frankenmerge\nmodels: [a]", "merge_method 'frankenmerge' is not supported"),
    ("merge_method: [ties, slerp]\nmodels: [a]", "merge_method ['ties', 'slerp'] is not supported"),
    ("merge_method: linear\nmodels: [a]\nfoo: 1", "unknown key 'foo'"),
    ("merge_method: linear\nslices: []", "'slices' must be a non-empty list"),
    ("merge_method: linear\nslices: [{sources: [{model: a, layer_range: [0, 2]}]}]\nmodels: [a]",
     "give exactly one of 'models', 'slices' or 'modules', not models and slices"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "ties needs 'base_model'"),
    ("merge_method: task_arithmetic\nbase_model: b\nmodels: [a]", "model 'a' has no weight"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, density: 1.5}}]",
     "models[0].parameters.density must be in (0, 1]"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: [0, one]}}]", "weight[1] must be a number"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1.0e+400}}]", "weight must be a number, not inf"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: one}}]", "weight must be a number"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1, gamma: 1}}]", "unknown parameter 'gamma'"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: int8", "dtype 'int8' is not supported"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nbase_model: b", "base_model 'b' is not one of"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: a, parameters: {weight: 1}}]",
     "model 'a' is listed twice"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: c, parameters: {weight: -1}}]",
     "the weights sum to 0"),
    ("merge_method: task_arithmetic\nbase_model: b\nmodels: [b]", "needs at least one model besides the base"),
    ("merge_method: dare_ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\nseed: -1",
     "seed must be a whole number"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nvision_source: z",
     "vision_source 'z' is not one of the models"),
    ("merge_method: [", "not valid YAML"),
    ("- a", "must be a YAML mapping"),
])
def test_config_messages(text, needle):
    with pytest.raises(InputError) as e:
        parse_config(text, "c.yaml")
    assert needle in e.value.message and e.value.message.startswith("c.yaml: ")
    assert "\n" not in e.value.message


def test_mergekit_config_runs_unchanged_and_warns_about_unused_keys():
    text = """
models:
  - model: base
  - model: a
    parameters: {density: 0.53, weight: 0.4}
  - model: b
    parameters: {density: 0.53, weight: 0.3}
merge_method: dare_ties
base_model: base
parameters:
  int8_mask: true
dtype: bfloat16
"""
    cfg = parse_config(text)
    assert cfg.method.name == "dare_ties" and cfg.base.ref == "base" and [m.ref for m in cfg.models] == ["a", "b"]
    assert cfg.outtype == "bf16" and not cfg.top_settings()["normalize"] and cfg.top_settings()["rescale"]
    assert cfg.models[0].parameters["density"] == 0.53 and cfg.warnings == []
    cfg = parse_config("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a, parameters: "
                       "{weight: 1, density: 0.5}}]\nseed: 3")
    assert any("density has no effect" in w for w in cfg.warnings) and any("seed" in w for w in cfg.warnings)


def test_viscodex_examples_are_the_paper_recipe():
    cfg = parse_config((ROOT / "examples" / "viscodex.yaml").read_text(), "viscodex.yaml")
    assert cfg.method.name == "task_arithmetic" and cfg.top_settings()["lambda"] == 1.0
    assert not cfg.top_settings()["normalize"] and cfg.form == "modules"
    text = cfg.modules["text_decoder"].slices[0]
    assert [(s.ref, s.parameters["weight"]) for s in text.sources] == [("Qwen2.5-VL-7B-Instruct", 0.7),
                                                                       ("OpenCodeReasoning-Nemotron-1.1-7B", 0.3)]
    assert text.base.ref == "Qwen2.5-7B-Instruct" and cfg.metadata_source == "Qwen2.5-VL-7B-Instruct"
    for module in ("vision_tower", "multi_modal_projector"):
        assert cfg.modules[module].method.name == "passthrough"
        assert [s.ref for s in cfg.modules[module].slices[0].sources] == ["Qwen2.5-VL-7B-Instruct"]
    cfg = parse_config((ROOT / "examples" / "viscodex-gguf.yaml").read_text(), "viscodex-gguf.yaml")
    assert [m.parameters["weight"] for m in cfg.models] == [0.7, 0.3]
    assert cfg.metadata_source == "Qwen2.5-VL-7B-Instruct-F16.gguf"


# -- GGUF in, GGUF out ------------------------------------------------------------------------

def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    reader = gguf_file.open_gguf(path)
    return {t.name: gguf_file.tensor_values(reader, t.name) for t in reader.tensors}


def test_gguf_q8_inputs_merge_in_f32(fx, tmp_path):
    cfg = write_config(tmp_path, "ties", [(fx / "vlm-q8.gguf", {"weight": 0.7, "density": 0.6}),
                                          (fx / "code-q8.gguf", {"weight": 0.5, "density": 0.6})],
                       base=fx / "base-q8.gguf", parameters={"lambda": 0.9})
    result = merge(cfg, tmp_path / "out.gguf", outtype="f32", chunk_elements=1000, threads=3)
    assert result.kind == "gguf" and result.outtype == "f32" and result.tensors == 21
    base, vlm, code = (gguf_tensors(fx / f"{n}-q8.gguf") for n in ("base", "vlm", "code"))
    out = gguf_tensors(tmp_path / "out.gguf")
    assert list(out) == list(base)
    for name, b in base.items():
        expected = reference_ties(b, [(vlm[name], 0.7, 0.6), (code[name], 0.5, 0.6)], lam=0.9)
        np.testing.assert_allclose(out[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_chunks_written_by_threads_equal_an_ordered_write(fx, tmp_path, monkeypatch, outtype):
    """Worker threads write their chunks at their offsets (os.pwrite); with no pwrite (Windows)
    the calling thread writes them in order: the same file either way, at any chunking."""
    cfg = write_config(tmp_path, "task_arithmetic", [(fx / "vlm.gguf", {"weight": 0.7}),
                                                     (fx / "code.gguf", {"weight": 0.5})], base=fx / "base.gguf")
    merge(cfg, tmp_path / "threads.gguf", outtype=outtype, chunk_elements=1000, threads=3)
    merge(cfg, tmp_path / "one.gguf", outtype=outtype, chunk_elements=1 << 18, threads=1)
    monkeypatch.delattr(os, "pwrite")
    merge(cfg, tmp_path / "ordered.gguf", outtype=outtype, chunk_elements=1000, threads=3)
    threads = (tmp_path / "threads.gguf").read_bytes()
    assert threads == (tmp_path / "one.gguf").read_bytes() == (tmp_path / "ordered.gguf").read_bytes()


def test_gguf_q8_output_types_metadata_and_llama_cpp(fx, tmp_path, llava_mmproj):
    cfg = write_config(tmp_path, "task_arithmetic", [(fx / "vlm-q8.gguf", {"weight": 0.7}),
                                                     (fx / "code-q8.gguf", {"weight": 0.5})], base=fx / "base-q8.gguf")
    res = run_cli("merge", cfg, "-o", tmp_path / "out.gguf", "--check-with", llava_mmproj, "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["outtype"] == "q8_0" and data["check"]["ok"]  # default: the base's own type
    reader = gguf_file.open_gguf(tmp_path / "out.gguf")
    base = gguf_file.open_gguf(fx / "base-q8.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.0.ffn_down.weight"] == Q.Q8_0
    assert types["token_embd.weight"] == Q.Q8_0
    assert gguf_file.value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert gguf_file.value(reader, "tokenizer.ggml.tokens") == gguf_file.value(base, "tokenizer.ggml.tokens")
    assert gguf_file.value(reader, "tokenizer.chat_template") == gguf_file.value(base, "tokenizer.chat_template")
    assert gguf_file.value(reader, "general.base_model.count") == 3
    assert gguf_file.value(reader, "general.base_model.2.name") == "tiny-code"
    assert gguf_file.value(reader, "ggraft.merge_method") == "task_arithmetic"
    assert json.loads(gguf_file.value(reader, "ggraft.merge_config"))["models"][0]["weight"] == 0.7
    b, v, c = (gguf_tensors(fx / f"{n}-q8.gguf")["blk.1.ffn_up.weight"] for n in ("base", "vlm", "code"))
    got = gguf_tensors(tmp_path / "out.gguf")["blk.1.ffn_up.weight"]
    expected = b + 0.7 * (v - b) + 0.5 * (c - b)
    assert np.abs(got - expected).max() <= np.abs(expected).max() / 127 + 1e-6  # one q8_0 step

    from ggraft.pair import engine

    engine.free_text_model(engine.load_text_model(tmp_path / "out.gguf", vocab_only=False))


def test_gguf_metadata_is_copied_byte_for_byte(tmp_path):
    """Every key of the base but those the merge describes anew reaches the output unchanged,
    with its type, down to a token that is not valid UTF-8."""
    from ggraft.jobs.merge.gguf_merge import NOT_COPIED

    paths = []
    for i, name in enumerate(("base", "a", "b")):
        w = gguf.GGUFWriter(tmp_path / f"{name}.gguf", "llama")
        w.add_name(name)
        w.add_token_list([b"\xff\xferaw", "ok", "\u2581word"])
        w.add_token_scores([0.0, -1.5, -2.25])
        w.add_bool("test.flag", True)
        w.add_array("test.ints", [3, -4, 5])
        w.add_tensor("token_embd.weight", np.full((3, 32), i, np.float16))
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        paths.append(tmp_path / f"{name}.gguf")
    cfg = write_config(tmp_path, "task_arithmetic", [(paths[1], {"weight": 1}), (paths[2], {"weight": 1})],
                       base=paths[0])
    merge(cfg, tmp_path / "out.gguf")
    base, out = gguf_file.scan_gguf(paths[0]), gguf_file.scan_gguf(tmp_path / "out.gguf")
    kept = [k for k in base.fields if not k.startswith(NOT_COPIED)]
    assert "tokenizer.ggml.tokens" in kept and "general.name" in kept
    for key in kept:
        assert (out.fields[key].type, out.fields[key].item_type) == (base.fields[key].type, base.fields[key].item_type)
        assert out.value(key, raw_strings=True) == base.value(key, raw_strings=True), key
    assert out.value("tokenizer.ggml.tokens", raw_strings=True)[0] == b"\xff\xferaw"


def test_gguf_merge_runs_in_llama_cpp_like_transformers(fx, tmp_path):
    """The merged GGUF's logits in llama.cpp equal transformers' on the same merged weights."""
    import torch
    from transformers import LlamaForCausalLM

    from fixtures import common
    from ggraft.pair import engine

    cfg = write_config(tmp_path, "task_arithmetic", [(fx / "code.gguf", {"weight": 0.6})], base=fx / "base.gguf",
                       parameters={"lambda": 1.5})
    merge(cfg, tmp_path / "out.gguf", outtype="f32")
    b, c = common.saved_tensors(fx / "base"), common.saved_tensors(fx / "code")
    model = LlamaForCausalLM.from_pretrained(fx / "base", dtype=torch.float32).eval()
    model.load_state_dict({k: torch.from_numpy(b[k] + 1.5 * 0.6 * (c[k] - b[k])) for k in b})
    tokens = [1, 17, 40, 99, 203, 7]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].numpy()
    llm = engine.open_llama(tmp_path / "out.gguf", n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens)
    got = np.asarray(llm.scores[: len(tokens)])
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999, cos


def test_gguf_big_endian_input_is_refused_in_one_line(fx, tmp_path):
    big = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(big, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("token_embd.weight", np.ones((3, 32), np.float16))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    cfg = write_config(tmp_path, "task_arithmetic", [(big, {"weight": 1.0})], base=fx / "base.gguf")
    res = run_cli("merge", cfg, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, "big.gguf: is a big-endian GGUF")
    assert list(tmp_path.glob("*out*")) == []


def test_gguf_missing_tensor_and_vocab_mismatch_are_named(fx, tmp_path):
    from fixtures import common, llava
    from fixtures.text_gguf import write_llama_gguf
    from fixtures.tokenizer import train

    text_config = json.loads((llava.build() / "hf" / "config.json").read_text())["text_config"]
    weights = common.saved_tensors(fx / "code")
    del weights["model.layers.1.mlp.up_proj.weight"]
    write_llama_gguf(tmp_path / "short.gguf", weights, text_config, train(special=("<image>",)), None, "short")
    cfg = write_config(tmp_path, "task_arithmetic", [(tmp_path / "short.gguf", {"weight": 1.0})], base=fx / "base.gguf")
    res = run_cli("merge", cfg, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, "short.gguf: has no tensor 'blk.1.ffn_up.weight'")
    assert list(tmp_path.glob("*out*")) == []  # nothing written, no temp file left

    cfg = write_config(tmp_path, "task_arithmetic", [(fx / "code-320.gguf", {"weight": 1.0})], base=fx / "base.gguf")
    res = run_cli("merge", cfg, "-o", tmp_path / "out.gguf")
    assert_one_line_error(res, "tensor 'output.weight' is [320, 96] in", "code-320.gguf", "--embed-common")
    res = run_cli("merge", cfg, "-o", tmp_path / "out.gguf", "--embed-common", "--outtype", "f32")
    assert res.code == 0, res.stderr
    base, code, out = (gguf_tensors(p) for p in (fx / "base.gguf", fx / "code-320.gguf", tmp_path / "out.gguf"))
    np.testing.assert_allclose(out["token_embd.weight"][:320], code["token_embd.weight"], rtol=1e-6)
    np.testing.assert_array_equal(out["token_embd.weight"][320], base["token_embd.weight"][320])


def test_failure_mid_write_leaves_no_output(fx, tmp_path, monkeypatch):
    from ggraft.jobs.merge import gguf_merge

    calls = []
    real = gguf_merge._tensor_merge

    def fail(first, stop):
        raise InputError("simulated failure")

    def failing(*args):  # the 5th tensor fails in the thread computing its last chunk
        calls.append(1)
        merge = real(*args)
        if len(calls) == 5:
            merge.chunks[-1] = (fail, *merge.chunks[-1][1:])
        return merge

    monkeypatch.setattr(gguf_merge, "_tensor_merge", failing)
    cfg = write_config(tmp_path, "linear", [(fx / "base.gguf", {"weight": 1}), (fx / "code.gguf", {"weight": 1})])
    (tmp_path / "out.gguf").write_bytes(b"old")
    with pytest.raises(InputError, match="simulated"):
        merge(cfg, tmp_path / "out.gguf", force=True)
    assert (tmp_path / "out.gguf").read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 2


# -- HF: VLM + plain LLMs -----------------------------------------------------------------------

def lm_of(folder: Path) -> dict[str, np.ndarray]:
    from fixtures import common

    names = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
             "model.language_model.": "model."}
    out = {}
    for k, v in common.saved_tensors(folder).items():
        for old, new in names.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        if k.startswith(("model.", "lm_head.")) and not k.startswith(("model.vision_tower", "model.multi_modal")):
            out[k] = v
    return out


def test_hf_vlm_plus_code_llm_converts_and_verifies(fx, llava_fixture, llava_mmproj, tmp_path):
    from fixtures import common
    from ggraft.jobs.verify import verify

    vlm = llava_fixture / "hf"
    cfg = write_config(tmp_path, "task_arithmetic", [(vlm, {"weight": 0.7}), (fx / "code", {"weight": 0.3})],
                       base=fx / "base", dtype="float32")
    res = run_cli("merge", cfg, "-o", tmp_path / "merged", "--json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["kind"] == "hf"
    out = tmp_path / "merged"
    merged, original = common.saved_tensors(out), common.saved_tensors(vlm)
    assert list(merged) == list(original)  # the VLM's names, all of them
    b, v, c = lm_of(fx / "base"), lm_of(vlm), lm_of(fx / "code")
    for name in b:  # VisCodex: θ_base + 0.7·τ_vlm + 0.3·τ_code (= 0.7·θ_vlm + 0.3·θ_code)
        np.testing.assert_allclose(lm_of(out)[name], b[name] + 0.7 * (v[name] - b[name]) + 0.3 * (c[name] - b[name]),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    for name in original:
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert merged[name].tobytes() == original[name].tobytes(), name
    for side in ("tokenizer.model", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (vlm / side).read_bytes(), side
    assert json.loads((out / "config.json").read_text()) == json.loads((vlm / "config.json").read_text())
    assert yaml.safe_load((out / "ggraft_merge.yaml").read_text())["merge_method"] == "task_arithmetic"

    res = run_cli("convert", out, "-o", tmp_path / "mmproj.gguf", "--outtype", "f32")
    assert res.code == 0, res.stderr
    assert gguf_tensors(tmp_path / "mmproj.gguf").keys() == gguf_tensors(llava_mmproj).keys()
    for name, value in gguf_tensors(llava_mmproj).items():  # vision is frozen: identical tensors
        np.testing.assert_array_equal(gguf_tensors(tmp_path / "mmproj.gguf")[name], value, err_msg=name)
    report = verify(out, tmp_path / "mmproj.gguf")  # transformers loads the merged checkpoint
    if not report.passed:  # the known llava runtime defect, nothing else
        assert report.runtime_note and "25814" in report.runtime_note
        assert report.runtime_result.min_cosine >= 0.9999


def test_hf_layouts_align_and_output_follows_the_vision_source(fx, llava_fixture, tmp_path):
    """vision source in the model.language_model.* layout, another VLM in language_model.model.*,
    a plain LLM as base; sharded output with an index."""
    from ggraft.hf.checkpoint import Checkpoint

    cfg = write_config(tmp_path, "dare_ties", [(llava_fixture / "hf", {"weight": 0.5, "density": 0.7}),
                                               (fx / "vlm-v5", {"weight": 0.5, "density": 0.7}),
                                               (fx / "code", {"weight": 0.4, "density": 0.7})],
                       base=fx / "base", vision_source=str(fx / "vlm-v5"), seed=5)
    merge(cfg, tmp_path / "merged", max_shard_bytes=400_000, threads=3, chunk_elements=500)
    out = Checkpoint(tmp_path / "merged")
    assert len(out.files) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    assert set(out.names()) == set(Checkpoint(fx / "vlm-v5").names())
    assert out.has("model.language_model.layers.0.mlp.up_proj.weight")
    assert out.has("model.vision_tower.embeddings.patch_embedding.weight")
    b, v, c = lm_of(fx / "base"), lm_of(llava_fixture / "hf"), lm_of(fx / "code")
    name = "model.layers.1.self_attn.q_proj.weight"
    models = [(v[name], 0.5, 0.7), (v[name], 0.5, 0.7), (c[name], 0.4, 0.7)]
    drop = lambda i, d, p: dare_drop(5, name)(i, d, p)  # noqa: E731 - DARE seeds on the canonical name
    expected = reference_ties(b[name], models, normalize=False, drop=drop)
    np.testing.assert_allclose(out.load("model.language_model.layers.1.self_attn.q_proj.weight"), expected,
                               rtol=1e-5, atol=1e-6)


def test_hf_embed_common_and_hf_specific_errors(fx, llava_fixture, tmp_path, llava_mmproj):
    vlm = llava_fixture / "hf"
    cfg = write_config(tmp_path, "task_arithmetic", [(vlm, {"weight": 0.7}), (fx / "code-320", {"weight": 0.3})],
                       base=fx / "base")
    res = run_cli("merge", cfg, "-o", tmp_path / "m")
    assert_one_line_error(res, "'lm_head.weight' is [320, 96] in", "code-320", "--embed-common")
    merge(cfg, tmp_path / "m", embed_common=True)
    from fixtures import common

    out, original = common.saved_tensors(tmp_path / "m"), common.saved_tensors(vlm)
    np.testing.assert_array_equal(out["language_model.lm_head.weight"][320], original["language_model.lm_head.weight"][320])

    assert_one_line_error(run_cli("merge", cfg, "-o", tmp_path / "m"), "exists; pass --force")
    assert_one_line_error(run_cli("merge", cfg, "-o", tmp_path / "q", "--outtype", "q8_0", "--embed-common"),
                          "an HF merge writes f32, f16 or bf16")
    assert_one_line_error(run_cli("merge", cfg, "-o", tmp_path / "q", "--check-with", llava_mmproj),
                          "--check-with checks a text GGUF")
    mixed = write_config(tmp_path, "task_arithmetic", [(fx / "code.gguf", {"weight": 1})], base=fx / "base",
                         name="mixed.yaml")
    assert_one_line_error(run_cli("merge", mixed, "-o", tmp_path / "x"), "must all be GGUF files or all Hugging Face folders")
    assert not (tmp_path / "q").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("outtype, dtype, rtol", [("bf16", "bfloat16", 2 ** -8), ("f16", "float16", 2 ** -11)])
def test_hf_half_precision_output(fx, llava_fixture, tmp_path, outtype, dtype, rtol):
    from ggraft.hf.checkpoint import Checkpoint

    cfg = write_config(tmp_path, "linear", [(llava_fixture / "hf", {"weight": 1}), (fx / "code", {"weight": 3})])
    merge(cfg, tmp_path / "m", outtype=outtype)
    out = Checkpoint(tmp_path / "m")
    name = "language_model.model.layers.0.mlp.gate_proj.weight"
    assert out.entries[name].dtype == outtype.upper()
    assert out.entries["multi_modal_projector.linear_1.weight"].dtype == "F32"  # vision: unchanged
    expected = (lm_of(llava_fixture / "hf")["model.layers.0.mlp.gate_proj.weight"]
                + 3 * lm_of(fx / "code")["model.layers.0.mlp.gate_proj.weight"]) / 4
    np.testing.assert_allclose(out.load(name), expected, rtol=rtol, atol=1e-6)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == dtype


def test_a_tensor_only_one_model_has_is_named():
    with pytest.raises(InputError, match=r"^b: has tensor 'extra', which a lacks$"):
        plan_tensors("a", {"a": {"w": (2, 2)}, "b": {"w": (2, 2), "extra": (3,)}}, [], embed_common=False)
    with pytest.raises(InputError, match=r"tensor 'w' is \[2, 3\] in b but \[2, 2\] in a"):
        plan_tensors("a", {"a": {"w": (2, 2)}, "b": {"w": (2, 3)}}, ["w"], embed_common=True)


def test_hf_and_gguf_paths_agree(fx, llava_fixture, tmp_path):
    """The same merge on HF folders and on their F32 GGUFs gives the same language model."""
    from fixtures import llava
    from fixtures.text_gguf import write_llama_gguf
    from fixtures.tokenizer import train

    models = [("vlm", llava_fixture / "hf", 0.6), ("code", fx / "code", 0.8)]
    hf = write_config(tmp_path, "ties", [(p, {"weight": w, "density": 0.5}) for _, p, w in models], base=fx / "base",
                      name="hf.yaml", dtype="float32")
    gg = write_config(tmp_path, "ties", [(fx / f"{n}.gguf", {"weight": w, "density": 0.5}) for n, _, w in models],
                      base=fx / "base.gguf", name="gguf.yaml")
    merge(hf, tmp_path / "hf-out")
    merge(gg, tmp_path / "out.gguf", outtype="f32")
    text_config = json.loads((llava_fixture / "hf" / "config.json").read_text())["text_config"]
    write_llama_gguf(tmp_path / "from-hf.gguf", lm_of(tmp_path / "hf-out"), text_config, train(special=("<image>",)),
                     llava.CHAT_TEMPLATE, "x")
    a, b = gguf_tensors(tmp_path / "from-hf.gguf"), gguf_tensors(tmp_path / "out.gguf")
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


# -- CLI ----------------------------------------------------------------------------------------

def narrow_mmproj(mmproj: Path, folder: Path) -> Path:
    """A copy of the mmproj whose projector outputs 64 values: it no longer fits a 96-wide text model."""
    reader = gguf.GGUFReader(mmproj)
    w = gguf.GGUFWriter(folder / "narrow.gguf", "clip")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value = 64 if field.name == gguf.Keys.ClipVision.PROJECTION_DIM else field.contents()
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, value, field.types[0], sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data[:64] if t.name.startswith("mm.2.") else t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return folder / "narrow.gguf"


def test_cli_exit_codes(fx, tmp_path, llava_mmproj):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [slerp, ties]\nmodels: [a]\n")
    assert_one_line_error(run_cli("merge", bad, "-o", tmp_path / "o.gguf"), "merge_method ['slerp', 'ties'] is not supported")
    bad.write_text("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1e400}}]\n")
    assert_one_line_error(run_cli("merge", bad, "-o", tmp_path / "o.gguf"), "weight must be a number, not '1e400'")
    missing = write_config(tmp_path, "linear", [("nowhere/model.gguf", {"weight": 1})], name="missing.yaml")
    assert_one_line_error(run_cli("merge", missing, "-o", tmp_path / "o.gguf"), "model 'nowhere/model.gguf': no such")
    assert_one_line_error(run_cli("merge", tmp_path / "none.yaml", "-o", tmp_path / "o.gguf"), "no such config file")

    cfg = write_config(tmp_path, "linear", [(fx / "base.gguf", {"weight": 1}), (fx / "code.gguf", {"weight": 1})],
                       dtype="float16")
    ok = run_cli("merge", cfg, "-o", tmp_path / "o.gguf")
    assert ok.code == 0 and "linear of 2 models" in ok.stdout and ", f16," in ok.stdout, ok.stderr
    assert_one_line_error(run_cli("merge", cfg, "-o", tmp_path / "o.gguf"), "exists; pass --force")
    # a text model given as the mmproj: refused before anything is written
    res = run_cli("merge", cfg, "-o", tmp_path / "o2.gguf", "--check-with", fx / "code.gguf")
    assert_one_line_error(res, "code.gguf")
    assert not (tmp_path / "o2.gguf").exists()
    # an mmproj of another width: the check fails, the merge stands, exit 1
    res = run_cli("merge", cfg, "-o", tmp_path / "o.gguf", "--force", "--check-with", narrow_mmproj(llava_mmproj, tmp_path))
    assert res.code == 1 and "NOT compatible" in res.stdout and "error:" in res.stdout, (res.stdout, res.stderr)
    assert (tmp_path / "o.gguf").is_file()
    vlm_as_input = write_config(tmp_path, "linear", [(fx / "base.gguf", {"weight": 1}),
                                                     (tmp_path / "o.gguf", {"weight": 1})], name="v.yaml")
    assert run_cli("merge", vlm_as_input, "-o", tmp_path / "o2.gguf", "--outtype", "bf16").code == 0
    reader = gguf_file.open_gguf(tmp_path / "o2.gguf")
    assert {t.tensor_type for t in reader.tensors} == {Q.F32, Q.BF16}
