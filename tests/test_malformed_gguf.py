"""Malformed GGUF files built byte by byte with struct.pack: every one is refused with one line
naming the file and the problem, without a traceback and without allocating more than the file."""
from __future__ import annotations

import random
import struct
import tracemalloc
from pathlib import Path

import gguf
import pytest
from conftest import assert_one_line_error, run_cli

from ggraft.errors import InputError
from ggraft.gguf_io.gguf_file import open_gguf, scan_gguf

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
T_F32, T_Q8_0 = 0, 8


def s(text: bytes | str, order: str = "<") -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(order + "Q", len(raw)) + raw


def kv(key: bytes | str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def str_kv(key: str, value: bytes | str) -> bytes:
    return kv(key, STRING, s(value))


def u32_kv(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def array_kv(key: str, item_type: int, count: int, items: bytes) -> bytes:
    return kv(key, ARRAY, struct.pack("<IQ", item_type, count) + items)


def info(name: bytes | str, dims: list[int], ttype: int = T_F32, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<q", d) for d in dims) + struct.pack("<IQ", ttype, offset))


BASE_KVS = [str_kv("general.architecture", "llama"), u32_kv("llama.embedding_length", 4),
            array_kv("tokenizer.ggml.tokens", STRING, 2, s("a") + s("b"))]
BASE_INFOS = [info("token_embd.weight", [4, 2]), info("output_norm.weight", [4], offset=32)]
BASE_DATA = bytes(range(32)) + bytes(16)


def build(kvs: list[bytes] | None = None, infos: list[bytes] | None = None, data: bytes | None = None, *,
          magic: bytes = b"GGUF", version: bytes = struct.pack("<I", 3), n_tensors: int | None = None,
          n_kv: int | None = None, align: int = 32) -> bytes:
    kvs = BASE_KVS if kvs is None else kvs
    infos = BASE_INFOS if infos is None else infos
    head = magic + version + struct.pack("<qq", len(infos) if n_tensors is None else n_tensors,
                                         len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + bytes((-len(body)) % align) + (BASE_DATA if data is None else data)


def build_big_endian() -> bytes:
    """The base file as a big-endian machine writes it (GGUF allows either order)."""
    def bs(text: str) -> bytes:
        return s(text, ">")
    kvs = [bs("general.architecture") + struct.pack(">I", STRING) + bs("llama"),
           bs("llama.embedding_length") + struct.pack(">II", U32, 4)]
    infos = [bs("token_embd.weight") + struct.pack(">Iqq", 2, 4, 2) + struct.pack(">IQ", T_F32, 0)]
    body = b"GGUF" + struct.pack(">Iqq", 3, 1, 2) + b"".join(kvs) + b"".join(infos)
    return body + bytes((-len(body)) % 32) + struct.pack(">8f", *range(8))


BASE = build()
_rng = random.Random(4)
LONG = "x" * 64

# (id, file bytes, what the one-line message must say)
CORPUS: list[tuple[str, bytes, str]] = [
    # header
    ("empty", b"", "empty"),
    ("three-bytes", b"GGU", "too short"),
    ("bad-magic", b"GGUX" + BASE[4:], "bad magic"),
    ("ggml-magic", b"lmgg" + BASE[4:], "bad magic"),
    ("random-bytes", bytes(_rng.randrange(256) for _ in range(500)), "bad magic"),
    ("version-0", build(version=struct.pack("<I", 0)), "unsupported GGUF version 0"),
    ("version-1", build(version=struct.pack("<I", 1)), "unsupported GGUF version 1"),
    ("version-4", build(version=struct.pack("<I", 4)), "unsupported GGUF version 4"),
    ("version-huge", build(version=struct.pack("<I", 0x7FFF1234)), "unsupported GGUF version"),
    ("version-1-big-endian", build(version=struct.pack(">I", 1)), "unsupported GGUF version 1"),
    ("cut-in-version", BASE[:6], "version"),
    ("cut-in-tensor-count", BASE[:12], "tensor count"),
    ("cut-in-kv-count", BASE[:20], "key/value count"),
    ("huge-kv-count", build(n_kv=2 ** 62), "header claims"),
    ("huge-tensor-count", build(n_tensors=2 ** 61), "header claims"),
    ("negative-tensor-count", build(n_tensors=-1), "negative counts"),
    ("negative-kv-count", build(n_kv=-5), "negative counts"),
    ("kv-count-too-high", build(n_kv=4), "not a valid"),
    ("header-only", BASE[:24], "header claims"),
    # keys and values
    ("huge-key-length", build([struct.pack("<Q", 2 ** 60) + b"general"]), "claims 1152921504606846976 bytes"),
    ("key-length-past-eof", build([struct.pack("<Q", len(BASE))]), "claims"),
    ("empty-key", build([kv("", U32, struct.pack("<I", 1)), *BASE_KVS]), "key 0 is empty"),
    ("key-not-utf8", build([kv(b"gen\xff\xfe", U32, struct.pack("<I", 1))]), "not valid UTF-8"),
    ("duplicate-key", build([*BASE_KVS, u32_kv("llama.embedding_length", 8)]), "duplicate key 'llama.embedding_length'"),
    ("unknown-value-type", build([kv("general.x", 13, b"\0" * 8)]), "unknown value type 13"),
    ("value-type-max", build([kv("general.x", 0xFFFFFFFF, b"\0" * 8)]), "unknown value type 4294967295"),
    ("huge-string-value", build([kv("general.name", STRING, struct.pack("<Q", 2 ** 63))]), "claims"),
    ("string-value-past-eof", build([kv("general.name", STRING, struct.pack("<Q", 10 ** 6) + b"abc")]), "claims 1000000"),
    ("array-of-arrays", build([array_kv("general.tags", ARRAY, 1, struct.pack("<IQ", U8, 0))]), "array of arrays"),
    ("unknown-array-item-type", build([array_kv("general.tags", 77, 1, b"\0")]), "unknown array item type 77"),
    ("huge-u32-array", build([array_kv("general.x", U32, 2 ** 61, b"")]), "claims an array of 2305843009213693952"),
    ("huge-string-array", build([array_kv("tokenizer.ggml.tokens", STRING, 2 ** 40, s("a"))]), "claims an array"),
    ("huge-bool-array", build([array_kv("general.flags", BOOL, 2 ** 50, b"\1")]), "claims an array"),
    ("string-in-array-past-eof", build([array_kv("tokenizer.ggml.tokens", STRING, 2, s("a") + struct.pack("<Q", 2 ** 62))]),
     "runs past the end"),
    ("string-array-cut", BASE[:BASE.index(b"tokenizer.ggml.tokens") + 21 + 12 + 9 + 4], "tokenizer.ggml.tokens"),
    ("u64-value-cut", build([kv("general.size", U64, b"\1\2")], [], b"", align=1), "value of key 'general.size'"),
    ("f64-value-cut", build([kv("general.scale", F64, b"\1")], [], b"", align=1), "value of key 'general.scale'"),
    ("cut-in-key", build([str_kv("general.architecture", "llama")], [])[:42], "key 0 claims 20 bytes"),
    ("cut-after-keys", BASE[:BASE.index(b"token_embd.weight") - 8], "tensor 0"),
    ("alignment-wrong-type", build([*BASE_KVS, kv("general.alignment", U64, struct.pack("<Q", 32))]), "must be a UINT32"),
    ("alignment-zero", build([*BASE_KVS, u32_kv("general.alignment", 0)]), "not a power of two"),
    ("alignment-three", build([*BASE_KVS, u32_kv("general.alignment", 3)]), "3 is not a power of two"),
    # tensor infos
    ("huge-tensor-name", build(infos=[struct.pack("<Q", 2 ** 62) + b"x"]), "claims"),
    ("tensor-name-too-long", build(infos=[info(LONG, [4, 2])]), "llama.cpp allows 63"),
    ("tensor-name-not-utf8", build(infos=[info(b"\xc3\x28bad", [4, 2])]), "not valid UTF-8"),
    ("duplicate-tensor", build(infos=[info("a.weight", [4, 2]), info("a.weight", [4], offset=32)]), "duplicate tensor 'a.weight'"),
    ("five-dims", build(infos=[info("t", [1, 1, 1, 1, 8])]), "5 dimensions"),
    ("huge-n-dims", build(infos=[info("t", [], n_dims=2 ** 31)]), "2147483648 dimensions"),
    ("negative-dim", build(infos=[info("t", [4, -2])]), "negative dimension"),
    ("overflowing-dims", build(infos=[info("t", [2 ** 40, 2 ** 40])]), "more than 2^63 elements"),
    ("unknown-tensor-type", build(infos=[info("t", [4, 2], ttype=99)]), "unknown type 99"),
    ("removed-tensor-type", build(infos=[info("t", [4, 2], ttype=4)]), "unknown type 4"),
    ("row-not-whole-blocks", build(infos=[info("t", [33, 1], ttype=T_Q8_0)], data=bytes(64)), "not a multiple of its block size 32"),
    ("cut-in-dims", BASE[:BASE.index(b"token_embd.weight") + 17 + 4 + 3], "dimension 0 of tensor 'token_embd.weight'"),
    ("cut-in-tensor-type", BASE[:BASE.index(b"output_norm.weight") + 18 + 4 + 8 + 2], "type of tensor 'output_norm.weight'"),
    ("offset-past-eof", build(infos=[BASE_INFOS[0], info("output_norm.weight", [4000], offset=32)]), "past the end of the file"),
    ("offset-misaligned", build(infos=[BASE_INFOS[0], info("output_norm.weight", [4], offset=33)]), "expected 32 (not aligned)"),
    ("offset-overlapping", build(infos=[BASE_INFOS[0], info("output_norm.weight", [4], offset=0)]), "expected 32 (each tensor's data must follow"),
    ("offset-gap", build(infos=[info("token_embd.weight", [4, 2], offset=64)]), "expected 0"),
    ("offset-huge", build(infos=[info("token_embd.weight", [4, 2], offset=2 ** 63)]), "expected 0"),
    ("data-cut", BASE[:-1], "past the end of the file"),
    ("data-missing", BASE[:-48], "past the end of the file"),
    ("gguf-then-garbage", b"GGUF" + bytes(_rng.randrange(256) for _ in range(300)), "not a valid"),
]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(data)
    return path


def test_base_files_are_valid(tmp_path):
    index = scan_gguf(write(tmp_path, "base", BASE))
    assert index.value("llama.embedding_length") == 4 and index.value("tokenizer.ggml.tokens") == ["a", "b"]
    assert [t.name for t in index.tensors] == ["token_embd.weight", "output_norm.weight"]
    assert gguf.GGUFReader(tmp_path / "base.gguf").tensors[1].n_elements == 4  # gguf-py agrees
    be = scan_gguf(write(tmp_path, "big-endian", build_big_endian()))
    assert be.order == ">" and be.value("llama.embedding_length") == 4 and be.value("general.architecture") == "llama"
    assert be.tensors[0].shape == (4, 2)


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 50 and len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("name, data, needle", CORPUS, ids=[c[0] for c in CORPUS])
def test_each_malformed_file_is_one_line_naming_file_and_problem(tmp_path, name, data, needle):
    path = write(tmp_path, name, data)
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as caught:
            scan_gguf(path, "GGUF file")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = caught.value.message
    assert "\n" not in message and str(path) in message and needle in message, message
    assert peak < 2 ** 20, f"{peak} bytes allocated while scanning a {len(data)}-byte file"
    with pytest.raises(InputError):  # gguf-py's reader is only reached after the same validation
        open_gguf(path)


def test_every_truncation_of_a_valid_file_is_refused(tmp_path):
    path = tmp_path / "cut.gguf"
    for n in range(len(BASE)):
        path.write_bytes(BASE[:n])
        with pytest.raises(InputError, match=str(path)):
            scan_gguf(path)


def test_random_byte_damage_is_refused_or_read(tmp_path):
    """Flipped bytes either leave a readable file or raise InputError, never anything else."""
    rng, path, refused = random.Random(7), tmp_path / "damaged.gguf", 0
    for _ in range(400):
        data = bytearray(BASE)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            scan_gguf(path).close()
        except InputError as e:
            refused += 1
            assert "\n" not in e.message and str(path) in e.message
    assert refused > 100


CLI_CASES = {c[0]: c for c in CORPUS if c[0] in (
    "empty", "bad-magic", "version-4", "huge-string-array", "duplicate-key", "five-dims", "offset-misaligned",
    "data-cut")}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_check_refuses_malformed_files(tmp_path, llava_fixture, name):
    _, data, needle = CLI_CASES[name]
    bad = write(tmp_path, name, data)
    text = llava_fixture / "text.gguf"
    if name in ("empty", "version-4", "five-dims", "data-cut"):
        result = run_cli("check", bad, text)
        what = "text GGUF"
    else:
        result = run_cli("check", text, bad)
        what = "mmproj GGUF"
    assert_one_line_error(result, str(bad), needle, f"not a valid {what}" if name != "empty" else "empty")


def test_cli_inspect_and_audit_refuse_malformed_files(tmp_path):
    bad = write(tmp_path, "bad", CORPUS[[c[0] for c in CORPUS].index("huge-u32-array")][1])
    assert_one_line_error(run_cli("inspect", bad), str(bad), "claims an array")
    assert_one_line_error(run_cli("audit", bad), str(bad), "claims an array")
    assert_one_line_error(run_cli("inspect", tmp_path / "missing.gguf"), "no such file")
    assert_one_line_error(run_cli("inspect", tmp_path), "is a directory")


def test_cli_text_model_given_as_mmproj(llava_fixture):
    text = llava_fixture / "text.gguf"
    assert_one_line_error(run_cli("check", text, text), str(text), "not an mmproj")


def test_typed_accessors_name_the_key_and_both_types(tmp_path):
    """A value stored with another type than its reader needs is one line: file, key, stored, expected."""
    kvs = [*BASE_KVS, u32_kv("clip.projector_type", 5), str_kv("clip.vision.image_size", "224"),
           kv("clip.vision.image_mean", ARRAY, struct.pack("<IQ", STRING, 1) + s("x")),
           kv("general.flag", BOOL, b"\1"), kv("general.eps", F32, struct.pack("<f", 1e-6))]
    index = scan_gguf(write(tmp_path, "typed", build(kvs)))
    assert index.integer("llama.embedding_length") == 4 and index.string("general.architecture") == "llama"
    assert index.flag("general.flag") is True and index.number("llama.embedding_length") == 4
    assert index.string_list("tokenizer.ggml.tokens") == ["a", "b"] and index.string("absent", "x") == "x"
    for read, key, stored, expected in (
            (index.string, "clip.projector_type", "UINT32", "a string"),
            (index.integer, "clip.vision.image_size", "STRING", "an integer"),
            (index.numbers_of, "clip.vision.image_mean", "an array of STRING", "an array of numbers"),
            (index.integers, "llama.embedding_length", "UINT32", "an array of integers"),
            (index.integer, "general.eps", "FLOAT32", "an integer"),
            (index.flag, "general.eps", "FLOAT32", "a bool")):
        with pytest.raises(InputError) as caught:
            read(key)
        assert caught.value.message == f"{index.path}: key {key} is stored as {stored}; expected {expected}"
    field = index.fields["llama.embedding_length"]
    for read in (index.strings, index.numbers, lambda f: index.string_at(f, 0)):
        with pytest.raises(InputError, match="key llama.embedding_length is stored as UINT32"):
            read(field)


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    import os

    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        scan_gguf(fifo)
    assert_one_line_error(run_cli("inspect", fifo, timeout=30), str(fifo), "not a regular file")
