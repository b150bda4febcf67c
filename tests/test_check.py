"""ggraft check: real GGUF pairs (the tiny LLaVA, and small GGUFs written here with gguf-py's
GGUFWriter) through the library and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli

from ggraft.pair.check import check_pair
from ggraft.pair.libmtmd import llama_cpp_knows
from ggraft.pair.vocab import vocab_forms
from ggraft.errors import IncompatibleError, InputError

Q = gguf.GGMLQuantizationType
BASE_TOKENS = ["<unk>", "<s>", "</s>", "▁a", "▁picture", "▁of", "<0x0A>"]
MISTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
GEMMA_TOKENS = ["<start_of_image>", "<end_of_image>"]
IMAGE_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                  "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
                  "{% endif %}{% endfor %}")
STRING_ONLY_TEMPLATE = "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% endif %}{% endfor %}"


def embeddings(n: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


def write_text(path: Path, tokens: list[str] | None = None, *, width: int = 64, embd: np.ndarray | None = None,
               qtype: Q = Q.F32, template: str | None = IMAGE_TEMPLATE, general_type: str | None = None,
               split_max_tensors: int = 0) -> Path:
    """A llama-architecture text GGUF with a vocab, token_embd and an output norm."""
    tokens = tokens if tokens is not None else BASE_TOKENS + MISTRAL_TOKENS
    w = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    if general_type:
        w.add_type(general_type)
    w.add_embedding_length(width)
    w.add_block_count(1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith(("<", "[")) and not t.startswith("<0x")
                       else gguf.TokenType.NORMAL for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if template:
        w.add_chat_template(template)
    embd = embeddings(len(tokens), width) if embd is None else embd
    if qtype == Q.F32:
        w.add_tensor("token_embd.weight", embd)
    else:
        w.add_tensor("token_embd.weight", gguf.quants.quantize(embd, qtype), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(width, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


#: a small vision tower: every mmproj written here carries all that llama.cpp requires of its projector
#: type (ggraft.mmproj.requirements), so each test sees only the finding it is about
VISION = dict(E=32, H=4, F=64, N=1, S=32, P=8, X=40, Y=24, Q=4)
TYPE_KEYS = {"idefics3": {gguf.Keys.ClipVision.Projector.SCALE_FACTOR: 2},
             "lfm2": {gguf.Keys.ClipVision.Projector.SCALE_FACTOR: 2},
             "qwen2.5vl_merger": {gguf.Keys.ClipVision.N_WA_PATTERN: 1}}


def write_mmproj(path: Path, projector: str = "pixtral", width: int = 64, *, vision: bool = True,
                 audio: bool = False, img_break: np.ndarray | None = None, projection_dim: int | None = None) -> Path:
    """A complete mmproj of ``projector`` projecting to ``width`` (a Pixtral one carries the text
    model's default [IMG_BREAK] row unless ``img_break`` is given)."""
    from ggraft.mmproj.requirements import PROJECTORS
    from ggraft.mmproj.requirements_fit import needed_tensors

    v = VISION
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_clip_has_vision_encoder(vision)
    if audio:
        w.add_clip_has_audio_encoder(True)
    w.add_clip_projector_type(projector)
    w.add_vision_projection_dim(projection_dim or width)
    w.add_vision_embedding_length(v["E"])
    w.add_vision_head_count(v["H"])
    w.add_vision_feed_forward_length(v["F"])
    w.add_vision_block_count(v["N"])
    w.add_vision_image_size(v["S"])
    w.add_vision_patch_size(v["P"])
    w.add_vision_attention_layernorm_eps(1e-6)
    w.add_vision_image_mean([0.5, 0.5, 0.5])
    w.add_vision_image_std([0.5, 0.5, 0.5])
    for key, value in TYPE_KEYS.get(projector, {}).items():
        w.add_uint32(key, value)
    shapes = needed_tensors(projector, {**v, "T": width}) if projector in PROJECTORS else {"mm.2.weight": (32, width)}
    if projector == "pixtral":
        shapes.pop("v.token_embd.img_break")
        img_break = img_break_row(width=width) if img_break is None else img_break
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(tuple(reversed(shape)), np.float32))
    if img_break is not None:
        w.add_tensor("v.token_embd.img_break", img_break.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def codes(report) -> dict[str, str]:
    return {f.code: f.severity for f in report.findings}


def img_break_row(tokens: list[str] = BASE_TOKENS + MISTRAL_TOKENS, width: int = 64) -> np.ndarray:
    return embeddings(len(tokens), width)[tokens.index("[IMG_BREAK]")]


# -- the tiny LLaVA pair -----------------------------------------------------------------------
def test_llava_pair_is_compatible(llava_fixture, llava_mmproj):
    result = run_cli("check", llava_fixture / "text.gguf", llava_mmproj, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"ok", "findings", "text", "mmproj"} and data["ok"] is True
    assert all(set(f) == {"code", "severity", "message", "hint"} for f in data["findings"])
    found = {f["code"]: f for f in data["findings"]}
    assert found["projector"]["severity"] == "info" and "'mlp'" in found["projector"]["message"]
    assert found["width"]["severity"] == "info" and "96" in found["width"]["message"]
    assert found["chat-template"]["severity"] == "info"
    assert data["text"]["embedding_length"] == 96 and data["mmproj"]["projection_width"] == 96
    assert data["mmproj"]["projection_width_from"] == "mm.2.weight dim 1"
    table = run_cli("check", llava_fixture / "text.gguf", llava_mmproj)
    assert table.code == 0 and "compatible" in table.stdout and "width" in table.stdout


def test_known_runtime_defects_are_warned_about():
    from ggraft.pair.runtime_defects import defects_for

    has_cls = lambda name: name == "v.class_embd"  # noqa: E731
    assert [d.reference for d in defects_for("mlp", has_cls, "0.3.36")] == ["ggml-org/llama.cpp#25814"]
    assert defects_for("mlp", lambda name: False, "0.3.36") == []  # no CLS, no defect
    assert defects_for("mlp", has_cls, "0.4.0") == [] and defects_for("gemma3", has_cls, "0.3.36") == []
    assert len(defects_for("pixtral", lambda name: False, "0.3.30")) == 1


def test_llava_pair_warns_of_the_cls_defect(llava_fixture, llava_mmproj):
    from ggraft.pair.libmtmd import installed_llama_cpp_python

    report = check_pair(llava_fixture / "text.gguf", llava_mmproj)
    defects = [f for f in report.findings if f.code == "runtime-defect"]
    if installed_llama_cpp_python() == "0.3.36":
        assert report.ok and len(defects) == 1 and defects[0].severity == "warning"
        assert "25814" in defects[0].message


def test_llava_swapped_and_duplicated(llava_fixture, llava_mmproj):
    text = llava_fixture / "text.gguf"
    assert_one_line_error(run_cli("check", llava_mmproj, text), "wrong way round", f"ggraft check {text} {llava_mmproj}")
    assert_one_line_error(run_cli("check", text, text), str(text), "not an mmproj", "'llama'")
    assert_one_line_error(run_cli("check", llava_mmproj, llava_mmproj), "is an mmproj", "not a text model")


# -- Pixtral: [IMG_BREAK] rows ---------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0])
def test_pixtral_img_break_matches(tmp_path, qtype):
    text = write_text(tmp_path / "text.gguf", qtype=qtype)
    mmproj = write_mmproj(tmp_path / "mmproj.gguf", img_break=img_break_row())
    report = check_pair(text, mmproj)
    assert report.ok, report.findings
    assert codes(report)["img-break"] == "info"
    assert codes(report)["boundary-tokens"] == "info"  # [IMG_END] is in the vocab


def test_pixtral_img_break_of_a_donor_is_an_error(tmp_path):
    text = write_text(tmp_path / "finetune.gguf", embd=embeddings(len(BASE_TOKENS) + 3, 64, seed=1))
    mmproj = write_mmproj(tmp_path / "donor.gguf", img_break=img_break_row())
    report = check_pair(text, mmproj)
    bad = next(f for f in report.findings if f.code == "img-break-mismatch")
    assert bad.severity == "error" and "ggraft graft" in bad.hint and "token 8" in bad.message
    result = run_cli("check", text, mmproj)
    assert result.code == 1 and "img-break-mismatch" in result.stdout and "incompatible" in result.stdout


def test_pixtral_img_break_against_llama_cpp_q4_k(tmp_path):
    """A K-quant made by llama.cpp itself: the row is dequantized by gguf-py and still matches."""
    import llama_cpp

    from fixtures.text_gguf import write_llama_gguf
    from fixtures.tokenizer import train

    vocab = train(special=tuple(MISTRAL_TOKENS))
    cfg = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 256, "intermediate_size": 256,
           "max_position_embeddings": 256}
    rng = np.random.default_rng(3)
    weights = {"model.embed_tokens.weight": rng.standard_normal((len(vocab), 256)).astype(np.float32) * 0.05,
               "model.norm.weight": np.ones(256, np.float32), "lm_head.weight": rng.standard_normal((len(vocab), 256)).astype(np.float32) * 0.05}
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        weights[f"model.layers.0.self_attn.{p}.weight"] = rng.standard_normal((256, 256)).astype(np.float32) * 0.05
    for p in ("gate_proj", "up_proj", "down_proj"):
        weights[f"model.layers.0.mlp.{p}.weight"] = rng.standard_normal((256, 256)).astype(np.float32) * 0.05
    weights["model.layers.0.input_layernorm.weight"] = np.ones(256, np.float32)
    weights["model.layers.0.post_attention_layernorm.weight"] = np.ones(256, np.float32)
    f32 = write_llama_gguf(tmp_path / "text-f32.gguf", weights, cfg, vocab, IMAGE_TEMPLATE, "tiny-mistral")
    q4 = tmp_path / "text-q4_k.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(q4).encode(), params) == 0
    row = weights["model.embed_tokens.weight"][vocab.special["[IMG_BREAK]"]]
    mmproj = write_mmproj(tmp_path / "mmproj.gguf", width=256, img_break=row)
    report = check_pair(q4, mmproj)
    assert report.ok, report.findings
    assert codes(report)["img-break"] == "info"
    embd_type = next(t.tensor_type for t in gguf.GGUFReader(q4).tensors if t.name == "token_embd.weight")
    assert embd_type == Q.Q4_K, embd_type  # dequantized by gguf-py, one row
    donor = write_mmproj(tmp_path / "donor.gguf", width=256, img_break=row[::-1].copy())
    assert codes(check_pair(q4, donor))["img-break-mismatch"] == "error"


def test_img_break_without_the_token(tmp_path):
    text = write_text(tmp_path / "text.gguf", BASE_TOKENS + ["[IMG_END]"])
    report = check_pair(text, write_mmproj(tmp_path / "mmproj.gguf", img_break=np.zeros(64)))
    assert codes(report)["img-break-missing"] == "error"


# -- widths, boundary tokens, projector ------------------------------------------------------
def test_width_mismatch_names_both_numbers(tmp_path):
    text = write_text(tmp_path / "text.gguf", width=64)
    report = check_pair(text, write_mmproj(tmp_path / "mmproj.gguf", width=80))
    bad = next(f for f in report.findings if f.code == "width-mismatch")
    assert bad.severity == "error" and "80" in bad.message and "64" in bad.message
    with pytest.raises(IncompatibleError, match="80"):  # ggraft run/serve refuse through the same check
        from ggraft.pair.runtime import preflight

        preflight(text, tmp_path / "mmproj.gguf")


def test_width_comes_from_the_tensor_llama_cpp_reads(tmp_path):
    text = write_text(tmp_path / "text.gguf", BASE_TOKENS + ["<|vision_start|>", "<|vision_end|>"], width=48)
    report = check_pair(text, write_mmproj(tmp_path / "m.gguf", "qwen2vl_merger", width=48, projection_dim=99))
    assert report.ok, report.findings
    assert report.mmproj["projection_width_from"] == "mm.2.bias dim 0"
    assert codes(report)["projection-dim-key"] == "warning"


@pytest.mark.parametrize("tokens, ok", [(BASE_TOKENS + GEMMA_TOKENS, True), (BASE_TOKENS + MISTRAL_TOKENS, False)])
def test_gemma3_boundary_tokens(tmp_path, tokens, ok):
    report = check_pair(write_text(tmp_path / "t.gguf", tokens), write_mmproj(tmp_path / "m.gguf", "gemma3"))
    assert report.ok is ok
    if not ok:
        missing = [f for f in report.findings if f.code == "boundary-token-missing"]
        assert {f.message.split("'")[3] for f in missing} == set(GEMMA_TOKENS)
        assert all("ggraft audit" in f.hint for f in missing)


def test_boundary_token_forms_per_vocab_type():
    assert vocab_forms("\n\n", "gpt2") == ["\n\n", "ĊĊ"]
    assert vocab_forms("\n", "llama") == ["\n", "<0x0A>"]
    assert vocab_forms("<fake_token_around_image>", "gpt2") == ["<fake_token_around_image>"]


def test_idefics3_looked_up_newlines(tmp_path):
    tokens = BASE_TOKENS + ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>"]
    report = check_pair(write_text(tmp_path / "t.gguf", tokens), write_mmproj(tmp_path / "m.gguf", "idefics3"))
    missing = [f for f in report.findings if f.code == "boundary-token-missing"]
    assert [("\\n\\n" in f.message, "-1" in f.message) for f in missing] == [(True, True)]  # "\n" is <0x0A>


def test_projector_unknown_to_installed_llama_cpp(tmp_path):
    assert llama_cpp_knows("pixtral") and llama_cpp_knows("mlp") and llama_cpp_knows("gemma3")
    assert llama_cpp_knows("not_a_projector") is False
    report = check_pair(write_text(tmp_path / "t.gguf"), write_mmproj(tmp_path / "m.gguf", "not_a_projector"))
    bad = next(f for f in report.findings if f.code == "projector-unknown")
    assert bad.severity == "error" and "not_a_projector" in bad.message and "llama-cpp-python" in bad.hint


def test_audio_only_mmproj(tmp_path):
    report = check_pair(write_text(tmp_path / "t.gguf"), write_mmproj(tmp_path / "m.gguf", vision=False, audio=True))
    bad = next(f for f in report.findings if f.code == "no-vision-encoder")
    assert bad.severity == "error" and "audio encoder but no vision encoder" in bad.message


def test_lora_adapter_as_text(tmp_path):
    report = check_pair(write_text(tmp_path / "t.gguf", general_type="adapter"), write_mmproj(tmp_path / "m.gguf"))
    assert codes(report)["text-is-adapter"] == "error"


# -- chat template ---------------------------------------------------------------------------
@pytest.mark.parametrize("template, code", [
    (None, "chat-template-missing"),
    (STRING_ONLY_TEMPLATE, "chat-template-no-image"),
    ("{% for m in messages %}{{ raise_exception('roles must alternate') }}{% endfor %}", "chat-template-error"),
    ("{% for m in messages %", "chat-template-error"),
])
def test_chat_template_that_cannot_place_an_image(tmp_path, template, code):
    report = check_pair(write_text(tmp_path / "t.gguf", template=template), write_mmproj(tmp_path / "m.gguf"))
    assert codes(report)[code] == "warning" and report.ok  # a warning, not an incompatibility


# -- split text models -----------------------------------------------------------------------
def test_split_text_model(tmp_path):
    write_text(tmp_path / "text.gguf", split_max_tensors=1, embd=embeddings(len(BASE_TOKENS) + 3, 64))
    first, second = tmp_path / "text-00001-of-00002.gguf", tmp_path / "text-00002-of-00002.gguf"
    assert first.exists() and second.exists()
    mmproj = write_mmproj(tmp_path / "m.gguf", img_break=img_break_row())
    report = check_pair(first, mmproj)
    assert report.ok and codes(report)["split-text"] == "info" and codes(report)["img-break"] == "info"
    assert_one_line_error(run_cli("check", second, mmproj), "shard 2 of 2", f"give {first}")
    second.rename(tmp_path / "elsewhere.gguf")
    with pytest.raises(InputError, match="shard 2 of 2 .* is missing"):
        check_pair(first, mmproj)
    renamed = tmp_path / "text-part1.gguf"
    first.rename(renamed)
    with pytest.raises(InputError, match="not named"):
        check_pair(renamed, mmproj)


# -- chat templates that would never finish --------------------------------------------------
COSTLY_TEMPLATES = {
    "nested ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                     "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "huge repeat": "{{ 'x' * 1000000000 }}",
    "huge power": "{{ 10 ** 100000000 }}",
}


@pytest.mark.parametrize("name", COSTLY_TEMPLATES)
def test_a_template_that_would_spin_is_refused_in_seconds(tmp_path, name):
    import time

    from ggraft.pair.runtime import preflight

    text, mmproj = write_text(tmp_path / "t.gguf", template=COSTLY_TEMPLATES[name]), write_mmproj(tmp_path / "m.gguf")
    started = time.perf_counter()
    report = check_pair(text, mmproj)
    assert time.perf_counter() - started < 10
    bad = next(f for f in report.findings if f.code == "chat-template-too-costly")
    assert bad.severity == "error" and "--raw" in bad.hint
    with pytest.raises(IncompatibleError, match="chat template"):  # run and serve would spin on every request
        preflight(text, mmproj)
    assert preflight(text, mmproj, raw=True)  # ggraft run --raw does not use the template
    result = run_cli("check", text, mmproj, timeout=60)
    assert result.code == 1 and "chat-template-too-costly" in result.stdout


def test_the_template_budget_counts_steps_not_loops():
    from ggraft.pair.chat_template import TemplateTooCostly, render_with_image

    loops = "{% for i in range(300) %}{% for j in range(300) %}{% endfor %}{% endfor %}ok"
    assert render_with_image(loops, "", "") == "ok"  # 90000 iterations: fine
    with pytest.raises(TemplateTooCostly, match="1000 steps"):
        render_with_image(loops, "", "", steps=1000)


def test_projector_type_stored_as_a_number(tmp_path):
    """llama.cpp aborts on a projector type that is not a string; check says so in one finding."""
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_clip_has_vision_encoder(True)
    w.add_uint32(gguf.Keys.Clip.PROJECTOR_TYPE, 5)
    w.add_tensor("mm.2.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    report = check_pair(write_text(tmp_path / "t.gguf"), path)
    bad = next(f for f in report.findings if f.code == "projector-missing")
    assert bad.severity == "error" and "5, not a string" in bad.message
    result = run_cli("check", tmp_path / "t.gguf", path)
    assert result.code == 1 and "Traceback" not in result.stderr
