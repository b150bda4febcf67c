"""``ggraft graft``: Mistral Small 3.1's tower on a text-only fine-tune (Devstral-style recipient).

The recipient's [IMG_BREAK] row must land in the mmproj (dequantized from whatever the text GGUF
holds), llama.cpp must run the pair, and disagreements must stop the graft before anything is written.
"""
from __future__ import annotations

import hashlib
import json

import gguf
import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error, gguf_tensors, run_cli
from ggraft.pair import engine
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.mmproj.converter import converter_for
from ggraft.errors import EngineError
from ggraft.jobs.graft import graft
from ggraft.gguf_io.output import write_gguf
from ggraft.mmproj.writer import convert
from ggraft.jobs.verify import test_image as make_image

BREAK = "v.token_embd.img_break"
BREAK_ID = 321
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def fixture():
    from fixtures import mistral3

    return mistral3.build()


@pytest.fixture(scope="module")
def grafted(fixture, tmp_path_factory):
    """The tower of the tiny Mistral3 grafted onto its Q8_0 text-only fine-tune, through the CLI."""
    out = tmp_path_factory.mktemp("graft") / "mmproj-grafted.gguf"
    res = run_cli("graft", "--donor", fixture / "hf", "--text", fixture / "recipient.gguf", "-o", out)
    assert res.code == 0, res.stderr
    assert "row 321 (Q8_0)" in res.stdout
    return out


@pytest.fixture(scope="module")
def donor_mmproj(fixture, tmp_path_factory):
    return convert(converter_for(Checkpoint(fixture / "hf")), tmp_path_factory.mktemp("donor") / "donor.gguf", "f16")


def recipient_row(path, tid=BREAK_ID) -> np.ndarray:
    return gguf_file.tensor_row(gguf.GGUFReader(path), "token_embd.weight", tid)


def test_break_row_is_the_recipients(grafted, fixture):
    row = np.asarray(gguf_tensors(grafted)[BREAK].data)
    assert np.array_equal(row, recipient_row(fixture / "recipient.gguf"))
    donor_row = Checkpoint(fixture / "hf").load_rows("language_model.model.embed_tokens.weight", BREAK_ID, 1)[0]
    assert not np.allclose(row, donor_row, atol=1e-3)  # the fine-tune moved it


def test_everything_else_is_the_donors(grafted, donor_mmproj):
    g, d = gguf_tensors(grafted), gguf_tensors(donor_mmproj)
    assert sorted(g) == sorted(d)
    for name in d:
        if name != BREAK:
            assert g[name].tensor_type == d[name].tensor_type, name
            assert np.array_equal(np.asarray(g[name].data), np.asarray(d[name].data)), name


def test_provenance(grafted, fixture):
    r = gguf.GGUFReader(grafted)
    v = lambda k: gguf_file.value(r, k)  # noqa: E731
    text = gguf.GGUFReader(fixture / "recipient.gguf")
    header = (fixture / "recipient.gguf").read_bytes()[: text.data_offset]
    assert v("ggraft.donor") == "hf" and v("ggraft.recipient") == "recipient.gguf"
    assert v("ggraft.recipient_header_sha256") == hashlib.sha256(header).hexdigest()
    assert v("ggraft.version") and v("ggraft.source_architecture") == "Mistral3ForConditionalGeneration"
    assert v("ggraft.image_token_ids") == [320, 321, 322]


@pytest.mark.parametrize("kind, qtype", [("f32", Q.F32), ("f16", Q.F16), ("bf16", Q.BF16), ("q4_k", Q.Q4_K),
                                         ("q6_k", Q.Q6_K)])
def test_any_recipient_type(fixture, tmp_path, kind, qtype):
    """F16/BF16/Q4_K/Q6_K recipients were written by llama.cpp's own quantizer."""
    text = fixture / f"recipient-{kind}.gguf"
    assert gguf_tensors(text)["token_embd.weight"].tensor_type == qtype
    report = graft(fixture / "hf", text, tmp_path / "m.gguf")
    assert report.rows[BREAK].endswith(f"({qtype.name})")
    expected = recipient_row(text)
    assert np.array_equal(np.asarray(gguf_tensors(tmp_path / "m.gguf")[BREAK].data), expected)
    # dequantized right: close to the f32 original of the same fine-tune
    assert np.abs(expected - recipient_row(fixture / "recipient-f32.gguf")).max() < 0.05


def test_native_donor_gives_the_same_mmproj(grafted, fixture, tmp_path):
    out = graft(fixture / "native", fixture / "recipient.gguf", tmp_path / "m.gguf").output
    g, n = gguf_tensors(grafted), gguf_tensors(out)
    assert sorted(g) == sorted(n)
    assert all(np.array_equal(np.asarray(g[k].data), np.asarray(n[k].data)) for k in g)


def test_llama_cpp_runs_the_grafted_pair(grafted, fixture):
    from ggraft.pair.runtime import Pair

    pair = Pair(fixture / "recipient.gguf", grafted, n_ctx=512, n_threads=2)
    pieces = list(pair.describe(ROOT / "fixtures" / "sample.png", "What is in the picture?",
                                stream=True, max_tokens=4, seed=1))
    assert len(pieces) >= 1


def test_llama_cpp_puts_the_recipients_row_between_image_rows(grafted, fixture):
    """llama.cpp appends the mmproj's [IMG_BREAK] row after each row of image tokens but the last.

    Known runtime defect (llama-cpp-python 0.3.36, tools/mtmd/models/pixtral.cpp): the break rows are
    built as ``ggml_scale(<unset tensor>, 0.0) + img_break``, so wherever the reused compute buffer held
    inf/NaN the row gets NaN entries.  Every finite entry still is the recipient's value, exactly."""
    row = recipient_row(fixture / "recipient.gguf")
    model = engine.load_text_model(fixture / "recipient.gguf")
    try:
        with engine.VisionEncoder(grafted, model, n_threads=2) as enc:
            out = enc.encode(make_image(48, 64), 256)
    finally:
        engine.free_text_model(model)
    assert out.shape == (3 * 4 + 2, 256)
    breaks = [4, 9]
    assert np.isfinite(np.delete(out, breaks, axis=0)).all()
    for b in breaks:
        finite = np.isfinite(out[b])
        assert finite.mean() > 0.5 and np.array_equal(out[b][finite], row[finite]), b


def test_mmproj_donor_keeps_types_and_replaces_the_row(fixture, donor_mmproj, tmp_path):
    q8 = convert(converter_for(Checkpoint(fixture / "hf")), tmp_path / "donor-q8.gguf", "q8_0")
    for donor in (donor_mmproj, q8):
        out = tmp_path / f"from-{donor.stem}.gguf"
        res = run_cli("graft", "--donor", donor, "--text", fixture / "recipient-q6_k.gguf", "-o", out)
        assert res.code == 0, res.stderr
        g, d = gguf_tensors(out), gguf_tensors(donor)
        assert sorted(g) == sorted(d)
        for name in d:
            if name != BREAK:  # the donor's own bytes: F16 and Q8_0 re-encode exactly
                assert g[name].tensor_type == d[name].tensor_type, name
                assert np.array_equal(np.asarray(g[name].data), np.asarray(d[name].data)), name
        assert np.array_equal(np.asarray(g[BREAK].data), recipient_row(fixture / "recipient-q6_k.gguf"))
        r, rd = gguf.GGUFReader(out), gguf.GGUFReader(donor)
        assert gguf_file.value(r, "general.file_type") == gguf_file.value(rd, "general.file_type")
        assert gguf_file.value(r, "ggraft.source") == "hf" and gguf_file.value(r, "ggraft.donor") == donor.name


def test_mmproj_donor_outtype_re_encodes(fixture, donor_mmproj, tmp_path):
    out = graft(donor_mmproj, fixture / "recipient.gguf", tmp_path / "m.gguf", outtype="f32").output
    assert {t.tensor_type for t in gguf_tensors(out).values()} == {Q.F32}
    assert gguf_file.value(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.ALL_F32


def test_mmproj_without_break_row_is_repaired(fixture, donor_mmproj, tmp_path):
    """The file llama.cpp's converter writes for this layout lacks the row, and llama.cpp refuses it;
    grafting it onto the recipient adds the recipient's row."""
    broken = tmp_path / "no-break.gguf"
    reader = gguf.GGUFReader(donor_mmproj)
    w = gguf.GGUFWriter(path=None, arch="clip")
    for key, f in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            w.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1] if array else None)
    kept = [(t.name, gguf.lazy.LazyNumpyTensor.from_eager(np.asarray(t.data, np.float32)), Q.F32)
            for t in reader.tensors if t.name != BREAK]
    write_gguf(broken, w, kept)
    model = engine.load_text_model(fixture / "recipient.gguf")
    try:
        with pytest.raises(EngineError, match="refused the mmproj"):
            engine.VisionEncoder(broken, model)
        assert any("unable to find tensor v.token_embd.img_break" in line for _, line in engine._LOG)
        out = graft(broken, fixture / "recipient.gguf", tmp_path / "fixed.gguf").output
        with engine.VisionEncoder(out, model, n_threads=2) as enc:
            assert enc.encode(make_image(48, 64), 256).shape == (14, 256)
    finally:
        engine.free_text_model(model)
    assert np.array_equal(np.asarray(gguf_tensors(out)[BREAK].data), recipient_row(fixture / "recipient.gguf"))


def test_token_id_disagreement_writes_nothing(fixture, tmp_path):
    out = tmp_path / "m.gguf"
    res = run_cli("graft", "--donor", fixture / "hf", "--text", fixture / "recipient-swapped.gguf", "-o", out)
    assert_one_line_error(res, "[IMG_BREAK]", "321", "322")
    assert "--allow-token-remap" in res.stderr and not out.exists()


def test_token_remap_takes_the_recipients_ids(fixture, tmp_path):
    out = tmp_path / "m.gguf"
    res = run_cli("graft", "--donor", fixture / "hf", "--text", fixture / "recipient-swapped.gguf", "-o", out,
                  "--allow-token-remap", "--json")
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["tokens"]["[IMG_BREAK]"] == {"donor": 321, "recipient": 322}
    assert report["notes"] == ["token ids remapped to the recipient's"]
    assert np.array_equal(np.asarray(gguf_tensors(out)[BREAK].data), recipient_row(fixture / "recipient-swapped.gguf", 322))
    assert gguf_file.value(gguf.GGUFReader(out), "ggraft.image_token_ids") == [320, 322, 321]


def test_break_token_not_special_writes_nothing(fixture, tmp_path):
    res = run_cli("graft", "--donor", fixture / "hf", "--text", fixture / "recipient-plain.gguf", "-o", tmp_path / "m.gguf")
    assert_one_line_error(res, "[IMG_BREAK]", "not a special token")
    assert not (tmp_path / "m.gguf").exists()


def test_width_mismatch_writes_nothing(fixture, donor_mmproj, tmp_path):
    for donor in (fixture / "hf", donor_mmproj):
        res = run_cli("graft", "--donor", donor, "--text", fixture / "recipient-wide.gguf", "-o", tmp_path / "m.gguf")
        assert_one_line_error(res, "width mismatch", "256", "320")
        assert not (tmp_path / "m.gguf").exists()


def test_bad_inputs_are_one_line(fixture, grafted, tmp_path):
    out = tmp_path / "m.gguf"
    swapped = run_cli("graft", "--donor", fixture / "text.gguf", "--text", fixture / "recipient.gguf", "-o", out)
    assert_one_line_error(swapped, "general.architecture is 'llama'")
    mmproj_as_text = run_cli("graft", "--donor", fixture / "hf", "--text", grafted, "-o", out)
    assert_one_line_error(mmproj_as_text, "is an mmproj")
    out.write_bytes(b"keep")
    exists = run_cli("graft", "--donor", fixture / "hf", "--text", fixture / "recipient.gguf", "-o", out)
    assert_one_line_error(exists, "--force")
    assert out.read_bytes() == b"keep"
    onto_input = run_cli("graft", "--donor", grafted, "--text", fixture / "recipient.gguf", "-o", grafted, "--force")
    assert_one_line_error(onto_input, "overwrite an input")


def test_vocab_lookup_takes_the_last_of_a_repeated_piece(tmp_path):
    """As llama.cpp's vocab does, a piece listed twice resolves to its last id."""
    from ggraft.jobs.graft import vocab_tokens

    path = tmp_path / "dup.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["a", "[IMG]", "xx[IMG]", "[IMG]", "b"])
    w.add_token_types([1, 3, 1, 4, 1])
    w.add_tensor("output_norm.weight", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    index = gguf_file.scan_gguf(path)
    assert vocab_tokens(index, ("[IMG]", "b", "zz")) == {"[IMG]": (3, 4), "b": (4, 1)}
    assert index.find_strings(gguf.Keys.Tokenizer.LIST, ["[IMG]"]) == {"[IMG]": 1}
