"""``ggraft bridge``: a donor mmproj re-targeted to a text model of another width and vocabulary.

For every projector type ggraft converts whose last layer is linear, the bridged mmproj run in
llama.cpp (mtmd encode) must give the donor mmproj's embeddings with the fitted map applied; the
fit must recover a planted linear relation between two tiny text models of different tokenizer
conventions; bad inputs are one line.  The text GGUFs come from ``fixtures/bridge.py``.
"""
from __future__ import annotations

import importlib
import json

import gguf
import numpy as np
import pytest

from conftest import BARS, assert_one_line_error, gguf_tensors, run_cli
from fixtures.bridge import BYTE_ALPHABET, Vocab, planted_pair, write_text_gguf
from ggraft.gguf_io import gguf_file
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs.bridge import bridge
from ggraft.jobs.bridge import tables
from ggraft.jobs.bridge.fit import fit_map, held_out_first
from ggraft.jobs.bridge.job import fit_between
from ggraft.jobs.bridge.last_layer import LAST_LINEAR, NOT_LINEAR, NOT_PROVEN, last_layer, output_width
from ggraft.jobs.bridge.tokens import piece_bytes, shared_tokens
from ggraft.jobs.graft import family_of
from ggraft.jobs.verify import llama_embeddings, test_image as make_image
from ggraft.mmproj.converter import converter_for, discover
from ggraft.mmproj.writer import convert
from ggraft.pair.boundary_tokens import BOUNDARY_TOKENS
from ggraft.pair.headers import projection_width

Q = gguf.GGMLQuantizationType
RECIPIENT_EXTRA = 24  # the recipient is this much wider than the donor
#: case -> (fixture module, builder, checkpoint folder, the fixture's text GGUF with the donor's vocab)
CASES = {
    "mlp": ("llava", "build", "hf", "text.gguf"),
    "pixtral": ("mistral3", "build", "hf", "text.gguf"),
    "gemma3": ("gemma3", "build", "hf", "text.gguf"),
    "idefics3": ("idefics3", "build", "hf", "text.gguf"),
    "lfm2": ("lfm2vl", "build", "hf", "vocab.gguf"),
    "qwen2vl_merger": ("qwen2vl", "build_qwen2", "hf", "vocab.gguf"),
    "qwen2.5vl_merger": ("qwen2vl", "build_qwen25", "hf", "vocab.gguf"),
    "qwen3vl_merger": ("qwen3vl", "build_qwen3vl", "hf", "text.gguf"),  # DeepStack: left out
    "qwen3vl_merger-qwen3.5": ("qwen3vl", "build_qwen35", "hf", "text.gguf"),
    "internvl": ("internvl", "build", "hf", "text.gguf"),
    "llama4": ("llama4", "build", "hf", "text.gguf"),
    "gemma4v": ("gemma4", "build", "hf", "vocab.gguf"),
    "gemma4uv": ("gemma4", "build_unified", "hf", "vocab.gguf"),
}


def fixture_folder(case: str):
    module, builder, _, _ = CASES[case]
    return getattr(importlib.import_module(f"fixtures.{module}"), builder)()


def boundary_texts(projector: str) -> tuple[str, ...]:
    return tuple(b.text for alt in BOUNDARY_TOKENS.get(projector, ()) for b in alt)


@pytest.fixture(scope="module")
def donors(tmp_path_factory):
    """``donors(case)``: (checkpoint folder, converter, f32 mmproj), converted once."""
    work, done = tmp_path_factory.mktemp("donors"), {}

    def get(case: str):
        if case not in done:
            folder = fixture_folder(case)
            conv = converter_for(Checkpoint(folder / CASES[case][2]))
            done[case] = folder, conv, convert(conv, work / f"{case}.gguf", "f32")
        return done[case]

    return get


def texts_for(mmproj, conv, folder, specials=None, **kw):
    """A planted pair of text GGUFs: the donor as wide as the mmproj's last layer, the recipient
    wider, both with the family's image and boundary tokens."""
    m = gguf_file.scan_gguf(mmproj)
    projector = m.value("clip.projector_type")
    width = output_width(m, last_layer(m, projector))
    tokens = tuple(dict.fromkeys((*conv.image_tokens, *boundary_texts(projector)))) if specials is None else specials
    return planted_pair(folder, width, width + RECIPIENT_EXTRA, specials=tokens, **kw)


def run_bridge(donor, donor_text, text, out, *extra):
    return run_cli("bridge", "--mmproj", donor, "--donor-text", donor_text, "--text", text, "-o", out, *extra)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def test_every_converted_projector_type_is_in_the_table():
    types = {cls.projector_type for classes in discover().values() for cls in classes}
    known = set(LAST_LINEAR) | set(NOT_LINEAR) | set(NOT_PROVEN)
    assert types <= known, types - known
    assert {c.split("-")[0] for c in CASES} == set(LAST_LINEAR)


@pytest.mark.parametrize("case", list(CASES))
def test_bridged_mmproj_computes_the_map_of_the_donors_output(case, donors, tmp_path):
    folder, conv, donor = donors(case)
    pair = texts_for(donor, conv, tmp_path / "texts")
    out = tmp_path / "bridged.gguf"
    report = bridge(donor, pair.donor, pair.recipient, out)
    assert report.fit.top1 > 0.99 and report.check is not None
    m, b = gguf_file.scan_gguf(donor), gguf_file.scan_gguf(out)
    projector = m.value("clip.projector_type")
    width = output_width(m, last_layer(m, projector))
    assert b.value("clip.vision.projection_dim") == width + RECIPIENT_EXTRA
    assert projection_width(b, projector)[0] == width + RECIPIENT_EXTRA  # as llama.cpp derives it
    layer = last_layer(m, projector)
    assert layer.bias is None or b.tensor(layer.bias) is not None  # written where the donor had none (pixtral)

    img = make_image(*conv.test_image_size())
    before = llama_embeddings(donor, img, projection_width(m, projector)[0], folder / CASES[case][3], 1)
    after = llama_embeddings(out, img, width + RECIPIENT_EXTRA, pair.recipient, 1)
    before, after = conv.llama_rows(before)[:, :width], conv.llama_rows(after)  # DeepStack slices: not bridged
    assert before.shape[0] == after.shape[0]
    assert cosines(report.linear(before), after).min() >= BARS["f32"]


def test_text_rows_are_the_recipients_or_mapped(donors, tmp_path):
    folder, conv, donor = donors("pixtral")
    name = "v.token_embd.img_break"
    own = texts_for(donor, conv, tmp_path / "own")  # the recipient has [IMG_BREAK]
    out = tmp_path / "own.gguf"
    report = bridge(donor, own.donor, own.recipient, out)
    tid = gguf_file.scan_gguf(own.recipient).find_strings("tokenizer.ggml.tokens", ["[IMG_BREAK]"])["[IMG_BREAK]"]
    expected = gguf_file.tensor_row(gguf_file.scan_gguf(own.recipient), "token_embd.weight", tid)
    assert np.array_equal(np.asarray(gguf_tensors(out)[name].data), expected)
    assert "its own row" in report.rows[name]

    mapped = texts_for(donor, conv, tmp_path / "mapped", specials=("[IMG]", "[IMG_END]"))
    out = tmp_path / "mapped.gguf"
    report = bridge(donor, mapped.donor, mapped.recipient, out)
    donor_row = np.asarray(gguf_tensors(donor)[name].data)
    assert np.allclose(np.asarray(gguf_tensors(out)[name].data), report.linear(donor_row), atol=1e-5)
    assert "mapped" in report.rows[name]


def test_deepstack_is_left_out(donors, tmp_path):
    _, conv, donor = donors("qwen3vl_merger")
    pair = texts_for(donor, conv, tmp_path / "texts")
    report = bridge(donor, pair.donor, pair.recipient, tmp_path / "out.gguf")
    b = gguf_file.scan_gguf(tmp_path / "out.gguf")
    assert not [t.name for t in b.tensors if t.name.startswith("v.deepstack.")]
    assert "clip.vision.is_deepstack_layers" not in b.fields
    assert any("DeepStack" in n for n in report.notes)


@pytest.mark.parametrize("arch,with_bias", [("llama", True), ("gemma3", True), ("llama", False)])
def test_fit_recovers_a_planted_linear_relation(tmp_path, arch, with_bias):
    pair = planted_pair(tmp_path, 48, 40, recipient_arch=arch, with_bias=with_bias, recipient_qtype=Q.F32)
    donor = tables.open_text_model(gguf_file.scan_gguf(pair.donor), "donor")
    recipient = tables.open_text_model(gguf_file.scan_gguf(pair.recipient), "recipient")
    assert recipient.input_scale == (np.sqrt(40) if arch == "gemma3" else 1.0)
    linear, scores = fit_between(donor, recipient, intercept=with_bias)
    assert scores.shared == pair.shared == 2 * 900  # " word" and "word" for each shared word
    assert scores.held_out == 180 and scores.top1 == 1.0 and scores.mean_cosine > 0.9999
    assert np.abs(linear.weight - pair.weight).max() < 5e-3
    assert np.abs(linear.bias - pair.bias).max() < 5e-3


def test_fit_scores_an_unrelated_table_as_chance():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2000, 32)).astype(np.float32), rng.normal(size=(2000, 24)).astype(np.float32)
    order, n_held = held_out_first(len(x))
    _, scores = fit_map(x[order], y[order], n_held)
    assert scores.top1 < 0.05 and abs(scores.mean_cosine) < 0.1


def test_tokens_pair_across_conventions(tmp_path):
    g, nl = BYTE_ALPHABET[ord(" ")], BYTE_ALPHABET[ord("\n")]
    spm = Vocab("llama", ["<unk>", "<s>", "▁the", "the", "<0x0A>", "▁cat", "<image>", "▁the", "\n"],
                [2, 3, 1, 1, 6, 1, 3, 1, 4], [])
    bpe = Vocab("gpt2", ["<|endoftext|>", g + "the", nl, "cat", g + "cat", "<image>", "the"], [3, 1, 1, 1, 1, 4, 1], [])
    a = write_text_gguf(tmp_path / "a.gguf", spm, np.zeros((len(spm), 8), np.float32))
    b = write_text_gguf(tmp_path / "b.gguf", bpe, np.zeros((len(bpe), 8), np.float32))
    ia, ib = gguf_file.scan_gguf(a), gguf_file.scan_gguf(b)
    assert piece_bytes(ia) == {b" the": 2, b"the": 3, b" cat": 5}  # control, byte, user-defined left out
    assert piece_bytes(ib) == {b" the": 1, b"\n": 2, b"cat": 3, b" cat": 4, b"the": 6}
    shared = shared_tokens(ia, ib)
    assert list(zip(shared.donor_ids.tolist(), shared.recipient_ids.tolist())) == [(2, 1), (3, 6), (5, 4)]


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.F16])
def test_embedding_rows_stream_in_chunks(tmp_path, monkeypatch, qtype):
    pair = planted_pair(tmp_path, 32, 64, recipient_qtype=qtype)
    model = tables.open_text_model(gguf_file.scan_gguf(pair.recipient), "recipient")
    ids = np.array([5, 2600, 0, 1234, 5, 700])
    whole = gguf_file.tensor_values(model.table, "token_embd.weight")
    monkeypatch.setattr(tables, "CHUNK_BYTES", 64 * 4 * 7)  # 7 rows a chunk
    assert np.array_equal(tables.embedding_rows(model, ids), whole[ids])


# -- the command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_pair(donors, tmp_path_factory):
    folder, conv, donor = donors("mlp")
    return donor, texts_for(donor, conv, tmp_path_factory.mktemp("llava-texts"))


def test_cli_prints_the_fit_and_writes_provenance(llava_pair, tmp_path):
    donor, pair = llava_pair
    out = tmp_path / "out.gguf"
    res = run_bridge(donor, pair.donor, pair.recipient, out)
    assert res.code == 0, res.stderr
    assert f"{pair.shared} shared tokens" in res.stdout and "held-out top-1 retrieval 100.0%" in res.stdout
    assert "mm.2.weight + mm.2.bias" in res.stdout and "wrote" in res.stdout
    b = gguf_file.scan_gguf(out)
    assert b.value("ggraft.bridge.recipient") == "recipient.gguf"
    assert b.value("ggraft.bridge.shared_tokens") == pair.shared
    assert b.value("ggraft.bridge.held_out_top1") == pytest.approx(1.0)
    assert b.value("ggraft.bridge.donor_text") == "donor.gguf"
    assert len(b.value("ggraft.bridge.recipient_header_sha256")) == 64


def test_cli_json(llava_pair, tmp_path):
    donor, pair = llava_pair
    out = tmp_path / "out.gguf"
    res = run_bridge(donor, pair.donor, pair.recipient, out, "--json")
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["fit"]["shared"] == pair.shared and data["fit"]["top1"] == 1.0
    assert data["widths"]["recipient"] == data["widths"]["donor"] + RECIPIENT_EXTRA
    assert data["check"]["ok"] and {f["code"] for f in data["check"]["findings"]} >= {"width", "boundary-tokens"}


def test_poor_fit_is_refused_unless_forced(llava_pair, tmp_path):
    donor, _ = llava_pair
    width = output_width(gguf_file.scan_gguf(donor), LAST_LINEAR["mlp"])
    pair = planted_pair(tmp_path / "texts", width, width + 8, noise=100.0)  # the plant drowned in noise
    out = tmp_path / "out.gguf"
    res = run_bridge(donor, pair.donor, pair.recipient, out)
    assert res.code == 1 and "too poor" in res.stderr and "below 50%" in res.stderr and not out.exists()
    res = run_bridge(donor, pair.donor, pair.recipient, out, "--force")
    assert res.code == 0 and out.exists() and "written with --force" in res.stderr


def test_outtype_q8_0(llava_pair, donors, tmp_path):
    folder, conv, _ = donors("mlp")
    donor, pair = llava_pair
    out = tmp_path / "out.gguf"
    report = bridge(donor, pair.donor, pair.recipient, out, outtype="q8_0")
    b = gguf_file.scan_gguf(out)
    assert b.value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert b.tensor("mm.2.weight").tensor_type == Q.Q8_0 and b.tensor("mm.2.bias").tensor_type == Q.F32
    img = make_image(*conv.test_image_size())
    before = llama_embeddings(donor, img, report.widths["donor"], folder / "text.gguf", 1)
    after = llama_embeddings(out, img, report.widths["recipient"], pair.recipient, 1)
    assert cosines(report.linear(before), after).min() >= BARS["q8_0"]


def test_checkpoint_folder_as_donor(llava_pair, donors, tmp_path):
    folder, _, _ = donors("mlp")
    _, pair = llava_pair
    out = tmp_path / "out.gguf"
    res = run_bridge(folder / "hf", pair.donor, pair.recipient, out)
    assert res.code == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]  # the converted donor is gone
    b = gguf_file.scan_gguf(out)
    assert b.value("general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert b.value("ggraft.bridge.donor_mmproj") == "hf"


def test_no_shared_tokens(llava_pair, tmp_path):
    donor, _ = llava_pair
    width = output_width(gguf_file.scan_gguf(donor), LAST_LINEAR["mlp"])
    pair = planted_pair(tmp_path / "texts", width, width + 8, overlap=0.0)
    res = run_bridge(donor, pair.donor, pair.recipient, tmp_path / "o.gguf")
    assert_one_line_error(res, "no shared tokens")


def test_text_gguf_as_mmproj(llava_pair, tmp_path):
    _, pair = llava_pair
    res = run_bridge(pair.recipient, pair.donor, pair.recipient, tmp_path / "o.gguf")
    assert_one_line_error(res, "is not an mmproj")


def test_projector_without_a_linear_last_layer(tmp_path):
    pytest.importorskip("timm", reason="transformers builds Gemma 3n's vision tower with timm, which is not installed")
    from fixtures import gemma3n

    donor = convert(converter_for(Checkpoint(gemma3n.build() / "hf")), tmp_path / "gemma3n.gguf", "f32")
    pair = planted_pair(tmp_path / "texts", 64, 72)
    res = run_bridge(donor, pair.donor, pair.recipient, tmp_path / "o.gguf")
    assert_one_line_error(res, "'gemma3nv' does not end with a linear layer", "RMS norm")


def test_donor_text_of_another_width(llava_pair, tmp_path):
    donor, pair = llava_pair
    res = run_bridge(donor, pair.recipient, pair.donor, tmp_path / "o.gguf")
    assert_one_line_error(res, "projects to", "--donor-text")


def test_existing_output_needs_force(llava_pair, tmp_path):
    donor, pair = llava_pair
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep")
    res = run_bridge(donor, pair.donor, pair.recipient, out)
    assert_one_line_error(res, "exists")
    assert out.read_bytes() == b"keep"


def test_family_of_every_case_is_known():
    for case in CASES:
        assert family_of(case.split("-")[0]) is not None
