"""Damaged inputs, generated case by case: every one ends in exit 1 or 2 (0 where accepting is
right), one error line naming the file, the key and what was expected, no traceback, no file
left behind, in seconds.

Kinds: config.json / preprocessor_config.json values and structure, safetensors headers and
indexes, GGUF values stored with the wrong type, paths (FIFOs, symlinks, markup in names,
outputs that exist), images, ``verify --image-size``, and a few merge configs.  Everything that
is refused before llama.cpp is reached runs in this process (``damage.inprocess``, hundreds of
cases in seconds, each under a time limit); the cases that load llama.cpp run in subprocesses.
The malformed GGUF structures have their own corpus (test_malformed_gguf.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import pytest
from conftest import run_cli

from damage import checkpoint_damage as cd
from damage.gguf_rewrite import rewritten
from damage.inprocess import assert_accepted, assert_refused, run_in_process

VT = gguf.GGUFValueType
K = gguf.Keys
CFG = "config.json"
PRE = "preprocessor_config.json"

# ------------------------------------------------------------------ config values
BAD_VALUES = {"minus-1": -1, "zero": 0, "1e12": 10 ** 12, "1.5": 1.5, "string": "big", "null": None,
              "list": [], "object": {}, "true": True}
VISION_INTS = ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size",
               "num_hidden_layers")

# (id, file, key path, value, what the message must name)
CONFIG_CASES: list[tuple[str, str, tuple[str, ...], object, tuple[str, ...]]] = []
for key in VISION_INTS:
    for label, value in BAD_VALUES.items():
        if key == "num_hidden_layers" and label == "zero":
            continue  # zero blocks is a value, judged by what llama.cpp needs (check), not here
        CONFIG_CASES.append((f"vision-{key}-{label}", CFG, ("vision_config", key), value,
                             (CFG, f"vision_config.{key}", "numbered blocks" if (key, label) == (
                                 "num_hidden_layers", "1e12") else "expected")))
for label, value in BAD_VALUES.items():
    CONFIG_CASES.append((f"text-hidden_size-{label}", CFG, ("text_config", "hidden_size"), value,
                         (CFG, "text_config.hidden_size", "expected")))
for section in ("vision_config", "text_config"):
    for label, value in {"list": [1, 2], "string": "x", "int": 3, "true": True}.items():
        CONFIG_CASES.append((f"{section}-as-{label}", CFG, (section,), value, (CFG, section, "a JSON object")))
for label, value in {"string": "LlavaForConditionalGeneration", "empty": [], "ints": [1], "object": {}}.items():
    CONFIG_CASES.append((f"architectures-{label}", CFG, ("architectures",), value, (CFG, "architectures", "list of strings")))
for key in ("model_type", "hidden_act"):
    for label, value in {"list": ["x"], "int": 1}.items():
        CONFIG_CASES.append((f"vision-{key}-{label}", CFG, ("vision_config", key), value, (f"vision_config.{key}", "a string")))
for label, value in {"string": "1e-5", "negative": -1e-5, "zero": 0, "two": 2}.items():
    CONFIG_CASES.append((f"layer_norm_eps-{label}", CFG, ("vision_config", "layer_norm_eps"), value,
                         ("vision_config.layer_norm_eps", "a number")))
for label, value in {"string": "x", "huge": 10 ** 30, "floats": [1.5], "object": {}}.items():
    CONFIG_CASES.append((f"vision_feature_layer-{label}", CFG, ("vision_feature_layer",), value,
                         ("vision_feature_layer", "expected")))
CONFIG_CASES += [
    ("select-strategy-list", CFG, ("vision_feature_select_strategy",), ["default"], ("vision_feature_select_strategy",)),
    ("layers-100000", CFG, ("vision_config", "num_hidden_layers"), 100000, ("num_hidden_layers", "numbered blocks")),
]
for stat in ("image_mean", "image_std"):
    for label, value in {"strings": ["a", "b", "c"], "numeric-strings": ["0.5", "0.5", "0.5"], "two": [0.5, 0.5],
                         "four": [0.5] * 4, "scalar": 0.5, "null": None, "nested": [[0.5], [0.5], [0.5]],
                         "huge": [1e300, 1, 1]}.items():
        CONFIG_CASES.append((f"{stat}-{label}", PRE, (stat,), value, (PRE, stat, "a list of 3 numbers")))

# (id, file, content, what the message must name)
DEEP = b"[" * 100_000 + b"]" * 100_000
RAW_JSON_CASES = [
    ("config-nested-100000-arrays", CFG, b'{"a": ' + DEEP + b"}", ("nested too deeply",)),
    ("config-nested-100000-objects", CFG, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, ("nested too deeply",)),
    ("config-not-json", CFG, b'{"architectures": ', ("not valid JSON",)),
    ("config-empty", CFG, b"", ("not valid JSON",)),
    ("config-array", CFG, b"[]", ("not a JSON object",)),
    ("config-null", CFG, b"null", ("not a JSON object",)),
    ("config-latin1", CFG, b'{"architectures": ["\xe9"]}', ("not valid JSON",)),
    ("config-5000-digit-int", CFG, b'{"x": ' + b"9" * 5000 + b"}", ("not valid JSON", "digits")),
    ("config-nan-eps", CFG, None, ("layer_norm_eps", "nan")),
    ("preprocessor-nested", PRE, DEEP, ("nested too deeply",)),
    ("preprocessor-array", PRE, b"[1, 2]", ("not a JSON object",)),
    ("preprocessor-infinite-std", PRE, b'{"image_mean": [0.5, 0.5, 0.5], "image_std": [1e400, 1, 1]}', ("image_std", "Infinity")),
]

#: values ggraft does not read, or reads as absent: the checkpoint converts (exit 0)
ACCEPTED_CONFIG = [
    ("unknown-key-junk", CFG, ("ggraft_test_junk",), [[[]], {"a": None}]),
    ("unread-rope-scaling-null", CFG, ("text_config", "rope_scaling"), None),
    ("unread-preprocessor-size-int", PRE, ("size",), 336),
    ("tokenizer-config-junk", "tokenizer_config.json", ("added_tokens_decoder",), {"abc": [1], "7": "x"}),
]


@pytest.fixture(scope="module")
def llava(llava_fixture) -> Path:
    return llava_fixture


def _convert(src: Path, out_dir: Path):
    return run_in_process("convert", src, "-o", out_dir / "o.gguf", watch=out_dir)


@pytest.mark.parametrize("name, file, path, value, needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_value(llava, tmp_path, name, file, path, value, needles):
    src = cd.set_json(llava / "hf", tmp_path / "ckpt", file, path, value)
    out = tmp_path / "out"
    out.mkdir()
    result = _convert(src, out)
    assert_refused(result, str(src / file), *needles)
    assert result.left == [] and result.seconds < 5, (result.left, result.seconds)


@pytest.mark.parametrize("name, file, content, needles", RAW_JSON_CASES, ids=[c[0] for c in RAW_JSON_CASES])
def test_config_file(llava, tmp_path, name, file, content, needles):
    if content is None:  # JSON's NaN, which Python reads
        text = (llava / "hf" / CFG).read_text()
        content = text.replace('"layer_norm_eps": 1e-05', '"layer_norm_eps": NaN').encode()
        assert b"NaN" in content
    src = cd.raw_file(llava / "hf", tmp_path / "ckpt", file, content)
    out = tmp_path / "out"
    out.mkdir()
    result = _convert(src, out)
    assert_refused(result, str(src / file), *needles)
    assert result.left == [] and result.seconds < 5


@pytest.mark.parametrize("name, file, path, value", ACCEPTED_CONFIG, ids=[c[0] for c in ACCEPTED_CONFIG])
def test_config_value_accepted(llava, tmp_path, name, file, path, value):
    src = cd.set_json(llava / "hf", tmp_path / "ckpt", file, path, value)
    out = tmp_path / "out"
    out.mkdir()
    result = _convert(src, out)
    assert_accepted(result)
    assert result.left == ["o.gguf"]


# ------------------------------------------------------------------ safetensors headers and indexes
def _drop_dtype(head: dict) -> dict:
    del head[cd.first_tensor(head)]["dtype"]
    return head


SAFETENSORS_CASES = [
    ("nested-100000", lambda h: b'{"a": ' + DEEP + b"}", "nested too deeply"),
    ("shape-10e30", cd.entry_field("shape", [10 ** 30]), "bad shape"),
    ("shape-0-by-10e30", cd.entry_field("shape", [0, 10 ** 30]), "bad shape"),
    ("shape-2e32-squared", cd.entry_field("shape", [2 ** 32, 2 ** 32]), "disagree with its shape"),
    ("shape-2e62-by-4", cd.entry_field("shape", [2 ** 62, 4]), "disagree with its shape"),
    ("shape-negative", cd.entry_field("shape", [-1, 96]), "bad shape"),
    ("shape-float", cd.entry_field("shape", [1.5]), "bad shape"),
    ("shape-bool", cd.entry_field("shape", [True]), "bad shape"),
    ("shape-string", cd.entry_field("shape", "ab"), "bad shape"),
    ("shape-null", cd.entry_field("shape", None), "malformed entry"),
    ("dtype-list", cd.entry_field("dtype", ["F32"]), "unsupported dtype"),
    ("dtype-unknown", cd.entry_field("dtype", "F8_E4M3"), "unsupported dtype"),
    ("dtype-missing", _drop_dtype, "malformed entry"),
    ("offsets-strings", cd.entry_field("data_offsets", ["0", "4"]), "data offsets"),
    ("offsets-one", cd.entry_field("data_offsets", [0]), "malformed entry"),
    ("offsets-negative", cd.entry_field("data_offsets", [-4, 0]), "data offsets"),
    ("offsets-past-2e64", cd.entry_field("data_offsets", [2 ** 70, 2 ** 70 + 4]), "data offsets"),
    ("entry-list", lambda h: {**h, cd.first_tensor(h): [1, 2]}, "malformed entry"),
    ("entry-string", lambda h: {**h, cd.first_tensor(h): "x"}, "malformed entry"),
    ("header-list", lambda h: [1], "not a JSON object"),
    ("header-null", lambda h: b"null", "not a JSON object"),
    ("header-not-utf8", lambda h: b'{"\xff": 1}', "not JSON"),
    ("header-5000-digit-int", lambda h: b'{"a": ' + b"9" * 5000 + b"}", "not JSON"),
]
WEIGHT_MAPS = {"ints": {"a": 1}, "list": [1], "parent-path": {"a": "../model.safetensors"}, "empty-name": {"a": ""},
               "mixed": {"a": cd.WEIGHTS, "b": 3}, "dot": {"a": "."}, "null": None, "absolute": {"a": "/etc/passwd"}}


@pytest.mark.parametrize("name, change, needle", SAFETENSORS_CASES, ids=[c[0] for c in SAFETENSORS_CASES])
def test_safetensors_header(llava, tmp_path, name, change, needle):
    src = cd.safetensors_header(llava / "hf", tmp_path / "ckpt", change)
    out = tmp_path / "out"
    out.mkdir()
    result = _convert(src, out)
    assert_refused(result, str(src / cd.WEIGHTS), "not a valid safetensors file", needle)
    assert result.left == [] and result.seconds < 5


@pytest.mark.parametrize("name", sorted(WEIGHT_MAPS))
def test_index_weight_map(llava, tmp_path, name):
    src = cd.linked_copy(llava / "hf", tmp_path / "ckpt")
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": WEIGHT_MAPS[name]}))
    out = tmp_path / "out"
    out.mkdir()
    result = _convert(src, out)
    assert_refused(result, str(index), "weight_map")
    assert result.left == []


@pytest.mark.parametrize("content, needle", [(b"", "shorter than its 8-byte header"),
                                             (b"\x10\0\0\0\0\0\0\0", "does not fit"),
                                             (b"\xff" * 8 + b"{}", "does not fit")], ids=["empty", "length-only", "length-2e64"])
def test_safetensors_too_short(llava, tmp_path, content, needle):
    src = cd.raw_file(llava / "hf", tmp_path / "ckpt", cd.WEIGHTS, content)
    assert_refused(_convert(src, tmp_path), str(src / cd.WEIGHTS), needle)


# ------------------------------------------------------------------ GGUF values of the wrong type
@pytest.fixture(scope="module")
def llava_pair(llava, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("pair") / "mmproj.gguf"
    assert_accepted(run_in_process("convert", llava / "hf", "-o", out, "--outtype", "f32"))
    return llava / "text.gguf", out


#: (id, which file, {key: (value, type[, item type])}, what check must name)
GGUF_VALUE_CASES = [
    ("projector_type-int", "mmproj", {K.Clip.PROJECTOR_TYPE: (5, VT.UINT32)}, K.Clip.PROJECTOR_TYPE),
    ("projector_type-string-array", "mmproj", {K.Clip.PROJECTOR_TYPE: (["mlp"], VT.ARRAY, VT.STRING)}, K.Clip.PROJECTOR_TYPE),
    ("mmproj-architecture-int", "mmproj", {K.General.ARCHITECTURE: (1, VT.UINT32)}, "general.architecture"),
    ("text-tokens-ints", "text", {K.Tokenizer.LIST: ([1, 2], VT.ARRAY, VT.UINT32)}, K.Tokenizer.LIST),
    ("text-width-string", "text", {"llama.embedding_length": ("96", VT.STRING)}, "llama.embedding_length"),
]
V = K.ClipVision
for key in (V.EMBEDDING_LENGTH, V.PROJECTION_DIM, V.IMAGE_SIZE, V.PATCH_SIZE, V.BLOCK_COUNT, V.FEED_FORWARD_LENGTH,
            V.Attention.HEAD_COUNT):
    for label, stored in {"string": ("64", VT.STRING), "float": (64.0, VT.FLOAT32), "array": ([64], VT.ARRAY, VT.UINT32)}.items():
        GGUF_VALUE_CASES.append((f"{key}-{label}", "mmproj", {key: stored}, key))
for key in (V.IMAGE_MEAN, V.IMAGE_STD):
    for label, stored in {"string": ("x", VT.STRING), "ints": ([1, 2, 3], VT.ARRAY, VT.UINT32)}.items():
        GGUF_VALUE_CASES.append((f"{key}-{label}", "mmproj", {key: stored}, key))
GGUF_VALUE_CASES += [(f"{key}-string", "mmproj", {key: ("x", VT.STRING)}, key)
                     for key in (V.Attention.LAYERNORM_EPS, K.Clip.HAS_VISION_ENCODER, V.USE_GELU)]


@pytest.mark.parametrize("name, role, keys, needle", GGUF_VALUE_CASES, ids=[c[0] for c in GGUF_VALUE_CASES])
def test_gguf_value_of_the_wrong_type(llava_pair, tmp_path, name, role, keys, needle):
    text, mmproj = llava_pair
    bad = rewritten(mmproj if role == "mmproj" else text, tmp_path / f"{name}.gguf", keys)
    pair = (text, bad) if role == "mmproj" else (bad, mmproj)
    assert_refused(run_in_process("check", *pair), needle, codes=(1, 2))
    assert_accepted(run_in_process("inspect", bad))  # inspect shows what is there


def test_gguf_token_list_of_ints_in_audit(llava_pair, tmp_path):
    bad = rewritten(llava_pair[0], tmp_path / "t.gguf", {K.Tokenizer.LIST: ([1, 2], VT.ARRAY, VT.UINT32)})
    assert_refused(run_in_process("audit", bad), str(bad), K.Tokenizer.LIST)


# ------------------------------------------------------------------ paths
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_fifos_are_refused_not_opened(llava, llava_pair, tmp_path):
    text, mmproj = llava_pair
    fifo = _fifo(tmp_path / "fifo.gguf")
    for args in (("check", fifo, mmproj), ("check", text, fifo), ("inspect", fifo), ("audit", fifo),
                 ("graft", "--donor", llava / "hf", "--text", fifo, "-o", tmp_path / "g.gguf"),
                 ("run", fifo, mmproj, "--image", fifo, "-p", "x"),
                 ("verify", llava / "hf", fifo)):
        result = run_in_process(*args, watch=tmp_path)
        assert_refused(result, str(fifo), "not a regular file")
        assert result.left == [], args
    for file in (cd.WEIGHTS, CFG, PRE):
        src = cd.fifo_file(llava / "hf", tmp_path / f"ckpt-{file}", file)
        assert_refused(_convert(src, tmp_path), str(src / file), "not a regular file")


def test_image_fifo_is_refused_before_the_pair_loads(llava_pair, tmp_path):
    fifo = _fifo(tmp_path / "image.png")
    assert_refused(run_in_process("run", *llava_pair, "--image", fifo, "-p", "x"), str(fifo), "not a regular file")


def test_input_paths(llava_pair, tmp_path):
    text, mmproj = llava_pair
    dangling = tmp_path / "dangling.gguf"
    os.symlink(tmp_path / "nowhere.gguf", dangling)
    cases = [(("inspect", "nope[/b].gguf"), ("nope[/b].gguf", "no such file")),
             (("inspect", tmp_path / "[bold]x :cat:.gguf"), ("[bold]x :cat:.gguf", "no such file")),
             (("inspect", dangling), (str(dangling), "dangling symlink")),
             (("check", tmp_path, mmproj), (str(tmp_path), "is a directory")),
             (("audit", tmp_path / "missing"), ("missing", "no such file"))]
    for args, needles in cases:
        assert_refused(run_in_process(*args), *needles)


def test_markup_in_output_names_is_printed_as_is(llava, tmp_path):
    for name in ("[bold]x.gguf", "a[b] :cat: [red]\\[x].gguf"):
        result = run_in_process("convert", llava / "hf", "-o", tmp_path / name)
        assert_accepted(result)
        assert f"wrote {tmp_path / name} " in result.stdout and (tmp_path / name).is_file()
        shown = run_in_process("inspect", tmp_path / name)
        assert_accepted(shown)
        assert shown.stdout.startswith(str(tmp_path / name))
    text = tmp_path / "[bf16] text :cat:.gguf"
    text.symlink_to(llava / "text.gguf")
    checked = run_in_process("check", text, tmp_path / "[bold]x.gguf")
    assert checked.code == 0 and f"text:   {text} (" in checked.stdout and f"mmproj: {tmp_path}/[bold]x.gguf (" in checked.stdout


def _output_commands(llava: Path, text: Path, mmproj: Path, out: Path) -> dict[str, tuple]:
    return {"convert": ("convert", llava / "hf", "-o", out),
            "graft": ("graft", "--donor", mmproj, "--text", text, "-o", out)}


@pytest.mark.parametrize("command", ["convert", "graft"])
def test_output_rule(llava, llava_pair, tmp_path, command):
    """One rule for every output: anything at the name (a dangling symlink too) needs --force; --force
    replaces the name itself, never a symlink's target; a folder is never replaced by a file."""
    text, mmproj = llava_pair
    target, link = tmp_path / "target.gguf", tmp_path / "out.gguf"
    os.symlink(target, link)
    result = run_in_process(*_output_commands(llava, text, mmproj, link)[command], watch=tmp_path)
    assert_refused(result, str(link), "exists", "--force", "symlink")
    assert result.left == [] and link.is_symlink() and not target.exists()
    result = run_in_process(*_output_commands(llava, text, mmproj, link)[command], "--force", watch=tmp_path)
    assert_accepted(result)
    assert not link.is_symlink() and link.is_file() and not target.exists() and result.left == []

    target.write_bytes(b"keep")
    link.unlink()
    os.symlink(target, link)
    assert_accepted(run_in_process(*_output_commands(llava, text, mmproj, link)[command], "--force"))
    assert target.read_bytes() == b"keep" and link.is_file() and not link.is_symlink()

    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    for extra in ((), ("--force",)):
        assert_refused(run_in_process(*_output_commands(llava, text, mmproj, folder)[command], *extra), "is a folder")
    for bad, needle in ((tmp_path / "no" / "x.gguf", "output folder does not exist"),
                        (tmp_path / ("x" * 300 + ".gguf"), "longer than 255 bytes")):
        result = run_in_process(*_output_commands(llava, text, mmproj, bad)[command], watch=tmp_path)
        assert_refused(result, needle)
        assert result.left == []


# ------------------------------------------------------------------ images (run; refused before llama.cpp loads)
def _images(folder: Path) -> dict[str, tuple[str, str]]:
    """{id: (the --image argument, what the message must say)}."""
    from PIL import Image

    Image.new("1", (12000, 12000)).save(folder / "huge.png")  # 18 KB on disk, 144 megapixels
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "ok.png")
    (folder / "truncated.png").write_bytes((folder / "ok.png").read_bytes()[:60])
    Image.new("RGB", (8, 8)).save(folder / "x.gif")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "dir.png").mkdir()
    return {"decompression-bomb": (str(folder / "huge.png"), "decompression bomb"),
            "truncated": (str(folder / "truncated.png"), "not a readable image"),
            "gif": (str(folder / "x.gif"), "GIF is not supported"),
            "empty": (str(folder / "empty.png"), "not a readable image"),
            "text": (str(folder / "text.png"), "not a readable image"),
            "folder": (str(folder / "dir.png"), "is a directory"),
            "missing": (str(folder / "missing.png"), "no such file"),
            "http-url": ("http://example.com/a.png", "http://example.com/a.png: remote image URLs are not fetched"),
            "https-url": ("https://example.com/a%20b.png", "https://example.com/a%20b.png"),
            "bad-data-uri": ("data:image/png;base64,@@@", "not valid base64"),
            "markup-name": (str(folder / "[bold]missing.png"), "[bold]missing.png")}


def test_images(llava_pair, tmp_path):
    for name, (image, needle) in _images(tmp_path).items():
        result = run_in_process("run", *llava_pair, "--image", image, "-p", "describe", watch=tmp_path)
        assert_refused(result, needle)
        assert "DecompressionBombWarning" not in result.stderr and result.left == [], name
        assert result.seconds < 5, (name, result.seconds)


def test_run_with_a_real_pair_in_a_subprocess(llava_pair, tmp_path):
    """End to end, where llama.cpp is loaded: a good image answers; a bomb and a FIFO end in one
    line, without a signal or a hang."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "ok.png")
    Image.new("1", (12000, 12000)).save(tmp_path / "huge.png")
    fifo = _fifo(tmp_path / "fifo.png")
    good = run_cli("run", *llava_pair, "--image", tmp_path / "ok.png", "-p", "hi", "--max-tokens", "2", timeout=120)
    assert good.code == 0 and "Traceback" not in good.stderr, good.stderr
    for image, needle in ((tmp_path / "huge.png", "decompression bomb"), (fifo, "not a regular file")):
        result = run_cli("run", *llava_pair, "--image", image, "-p", "hi", timeout=60)
        assert result.code == 2 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------------ verify --image-size
IMAGE_SIZES = ["1x1", "0x0", "-56x56", "56x-56", "57x56", "56x100000", "99999999999x56", "axb", "56", "56x56x56", "x",
               "9" * 5000 + "x56"]


def test_verify_image_size(llava, llava_pair, tmp_path):
    for size in IMAGE_SIZES:
        result = run_in_process("verify", llava / "hf", llava_pair[1], "--image-size", size, watch=tmp_path)
        assert_refused(result, "--image-size")
        assert result.left == [] and result.seconds < 5, size


# ------------------------------------------------------------------ merge configs (the few that pass today)
MERGE_CONFIGS = {
    "method-list": ("merge_method: [ties]\nmodels:\n  - model: {text}\n", "merge_method"),
    "weight-1e400": ("merge_method: linear\nmodels:\n  - model: {text}\n    parameters: {{weight: 1e400}}\n"
                     "  - model: {text}\n    parameters: {{weight: 1}}\n", "weight"),
    "not-a-mapping": ("- 1\n- 2\n", "mapping"),
    "nul-byte": ("\x00", "not valid YAML"),
    "nested-100000-deep": ("a: " + "[" * 100000 + "]" * 100000 + "\n", "nested too deeply"),
}


@pytest.mark.parametrize("name", sorted(MERGE_CONFIGS))
def test_merge_config(llava_pair, tmp_path, name):
    text, needle = MERGE_CONFIGS[name]
    config = tmp_path / "merge.yaml"
    config.write_text(text.format(text=llava_pair[0]))
    result = run_in_process("merge", config, "-o", tmp_path / "out.gguf", watch=tmp_path)
    assert_refused(result, str(config), needle)
    assert result.left == []


def test_merge_config_fifo(tmp_path):
    fifo = _fifo(tmp_path / "merge.yaml")
    assert_refused(run_in_process("merge", fifo, "-o", tmp_path / "o.gguf"), str(fifo))


def test_corpus_size(tmp_path):
    kinds = {"config values": len(CONFIG_CASES) + len(ACCEPTED_CONFIG), "JSON files": len(RAW_JSON_CASES),
             "safetensors": len(SAFETENSORS_CASES) + len(WEIGHT_MAPS) + 3, "GGUF values": len(GGUF_VALUE_CASES) + 1,
             "images": len(_images(tmp_path)) + 2, "image sizes": len(IMAGE_SIZES), "merge configs": len(MERGE_CONFIGS) + 1}
    assert all(kinds.values()) and sum(kinds.values()) >= 200, kinds



def test_run_with_a_template_that_fails_on_image_parts(llava_pair, tmp_path):
    """A chat template that breaks on list content (as SmolLM2-135M-Instruct's does) is one line
    pointing to --raw, not the bug line; --raw still runs."""
    from PIL import Image

    V = gguf.GGUFValueType
    template = "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
    text = rewritten(llava_pair[0], tmp_path / "text.gguf", {"tokenizer.chat_template": (template, V.STRING)})
    Image.new("RGB", (56, 56), "red").save(tmp_path / "img.png")
    args = ("run", text, llava_pair[1], "--image", tmp_path / "img.png", "-p", "hi", "--max-tokens", "2")
    result = run_cli(*args, timeout=120)
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    assert "chat template fails" in result.stderr and "--raw" in result.stderr and "bug" not in result.stderr
    assert run_cli(*args, "--raw", timeout=120).code == 0
