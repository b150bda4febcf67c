"""ggraft audit and ggraft inspect on real files: the tiny LLaVA, and tokenizers / GGUFs written here."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from conftest import assert_one_line_error, run_cli

from ggraft.gguf_io import gguf_file
from ggraft.jobs.audit import audit
from ggraft.jobs.inspect import inspect_gguf

Q = gguf.GGMLQuantizationType


def write_text(path: Path, tokens: list[str], width: int = 64, qtype: Q = Q.F32) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(width)
    w.add_block_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("<") else gguf.TokenType.NORMAL for t in tokens])
    embd = np.random.default_rng(0).standard_normal((len(tokens), width)).astype(np.float32)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(embd, qtype), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(width, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


PLAIN = ["a", "b", "Ġthe", "Ċ"]


def test_audit_llava_gguf_and_hf(llava_fixture):
    result = run_cli("audit", llava_fixture / "text.gguf", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    [image] = data["tokens"]
    assert image["token"] == "<image>" and image["kind"] == "control" and image["special"] is True
    assert data["families"][0] == {"family": "LLaVA", "found": 1, "expected": 1}
    assert any("LlavaForConditionalGeneration" in d for d in data["donors"]["LLaVA"])
    hf = audit(llava_fixture / "hf")
    assert [(t.token, t.id, t.kind) for t in hf.tokens] == [("<image>", image["id"], "special")]
    table = run_cli("audit", llava_fixture / "text.gguf")
    assert "<image>" in table.stdout and "LLaVA (1 of 1 tokens): donors: LLaVA" in table.stdout


def test_audit_tokenizer_json_qwen(tmp_path):
    vocab = {t: i for i, t in enumerate(PLAIN)}
    added = [{"id": 4 + i, "content": c, "special": True} for i, c in
             enumerate(["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added}))
    report = audit(tmp_path)
    assert [(t.token, t.id, t.special) for t in report.tokens] == [
        ("<|vision_start|>", 5, True), ("<|vision_end|>", 6, True), ("<|image_pad|>", 7, True)]
    assert report.families[0] == {"family": "Qwen-VL", "found": 3, "expected": 5}
    assert report.vocab_size == 8 and report.tokenizer == "tokenizer.json"


def test_audit_mistral_tekken(tmp_path):
    specials = [{"rank": i, "token_str": t, "is_control": True}
                for i, t in enumerate(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"])]
    (tmp_path / "tekken.json").write_text(json.dumps({"config": {}, "vocab": [], "special_tokens": specials}))
    report = audit(tmp_path)
    assert [t.token for t in report.tokens] == ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    assert report.families == [{"family": "Pixtral / Mistral", "found": 3, "expected": 3}]
    assert set(report.donors) == {"Pixtral / Mistral"}


def test_audit_idefics3_tile_tokens(tmp_path):
    tiles = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    text = write_text(tmp_path / "smol.gguf", PLAIN + ["<fake_token_around_image>", "<global-img>", "<image>", *tiles])
    data = json.loads(run_cli("audit", text, "--json").stdout)
    assert len(data["tokens"]) == 3 + 16
    assert data["families"][0] == {"family": "Idefics3 / SmolVLM", "found": 4, "expected": 4}
    table = run_cli("audit", text).stdout
    assert "<row_1_col_1>" in table and "… 13 more tile tokens" in table


def test_audit_text_only_model(tmp_path):
    text = write_text(tmp_path / "plain.gguf", PLAIN + ["<|endoftext|>"])
    result = run_cli("audit", text)
    assert result.code == 0 and "latent vision tokens: none found" in result.stdout
    assert json.loads(run_cli("audit", text, "--json").stdout)["tokens"] == []


def test_audit_refuses_what_has_no_tokenizer(tmp_path, llava_mmproj):
    assert_one_line_error(run_cli("audit", llava_mmproj), "is an mmproj", "no tokenizer")
    assert_one_line_error(run_cli("audit", tmp_path), "no tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    assert_one_line_error(run_cli("audit", tmp_path), "not valid JSON")
    assert_one_line_error(run_cli("audit", tmp_path / "nope"), "no such file")


def test_inspect_mmproj(llava_mmproj):
    result = run_cli("inspect", llava_mmproj, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["architecture"], data["type"], data["file_type"]) == ("clip", "mmproj", "ALL_F32")
    assert data["projector"]["type"] == "mlp" and data["projector"]["known_to_llama_cpp"] is True
    assert data["projector"]["output_width"] == 96 and data["projector"]["has_vision_encoder"] is True
    assert data["widths"]["vision"]["block_count"] == 3 and data["widths"]["vision"]["embedding_length"] == 64
    assert data["provenance"]["source_architecture"] == "LlavaForConditionalGeneration" and "version" in data["provenance"]
    reader = gguf.GGUFReader(llava_mmproj)
    assert data["tensor_count"] == len(reader.tensors) == data["tensor_types"]["F32"]["count"]
    assert data["tensor_bytes"] == sum(int(t.n_bytes) for t in reader.tensors)
    table = run_cli("inspect", llava_mmproj).stdout
    assert "projector.type" in table and "mlp" in table and "total" in table


def test_inspect_quantized_text(tmp_path):
    text = write_text(tmp_path / "q8.gguf", PLAIN * 8, qtype=Q.Q8_0)
    report = inspect_gguf(text)
    assert report.architecture == "llama" and report.widths == {"embedding_length": 64, "block_count": 2}
    assert report.tensor_types == {"F32": {"count": 1, "bytes": 256}, "Q8_0": {"count": 1, "bytes": 32 * 2 * 34}}
    assert report.tokenizer == {"model": "gpt2", "tokens": 32, "chat_template": False}


def test_index_and_gguf_py_reader_agree(tmp_path, llava_fixture):
    """gguf_file's helpers give the same answers on the fast index and on gguf-py's GGUFReader."""
    text = write_text(tmp_path / "q8.gguf", PLAIN * 8, qtype=Q.Q8_0)
    for path in (text, llava_fixture / "text.gguf"):
        index, reader = gguf_file.scan_gguf(path), gguf_file.open_gguf(path)
        assert gguf_file.metadata(index) == gguf_file.metadata(reader)
        assert gguf_file.value(index, "tokenizer.ggml.tokens") == gguf_file.value(reader, "tokenizer.ggml.tokens")
        for t in reader.tensors:
            assert tuple(int(n) for n in t.shape) == gguf_file.tensor(index, t.name).shape
            assert np.array_equal(gguf_file.tensor_values(index, t.name), gguf_file.tensor_values(reader, t.name))
        assert np.array_equal(gguf_file.tensor_row(index, "token_embd.weight", 5),
                              gguf_file.tensor_row(reader, "token_embd.weight", 5))
