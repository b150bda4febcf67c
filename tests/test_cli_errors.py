"""Bad input: one line on stderr, exit 2, no traceback, no output file left behind."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_one_line_error, run_cli


@pytest.fixture
def ckpt(llava_fixture, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(llava_fixture / "hf", dst)
    return dst


def convert(src, out):
    return run_cli("convert", src, "-o", out)


def test_missing_directory(tmp_path):
    assert_one_line_error(convert(tmp_path / "nope", tmp_path / "o.gguf"), "no such directory")
    assert not (tmp_path / "o.gguf").exists()


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    assert_one_line_error(convert(ckpt, tmp_path / "o.gguf"), "no config.json")
    assert not (tmp_path / "o.gguf").exists()


def test_unknown_architecture_names_it_and_lists_supported(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["FancyVisionModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(convert(ckpt, tmp_path / "o.gguf"), "FancyVisionModel", "LlavaForConditionalGeneration")


def test_pickle_only_is_refused(ckpt, tmp_path):
    for f in ckpt.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    assert_one_line_error(convert(ckpt, tmp_path / "o.gguf"), "pickle", "pytorch_model.bin")
    assert not (tmp_path / "o.gguf").exists()


def test_truncated_safetensors(ckpt, tmp_path):
    f = next(ckpt.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    assert_one_line_error(convert(ckpt, tmp_path / "o.gguf"), "truncated")
    assert not (tmp_path / "o.gguf").exists()


def test_garbage_safetensors_header(ckpt, tmp_path):
    f = next(ckpt.glob("*.safetensors"))
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert_one_line_error(convert(ckpt, tmp_path / "o.gguf"), "not a valid safetensors file")


def test_existing_output_needs_force(llava_fixture, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    assert_one_line_error(convert(llava_fixture / "hf", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"


def test_unknown_outtype(llava_fixture, tmp_path):
    res = run_cli("convert", llava_fixture / "hf", "-o", tmp_path / "o.gguf", "--outtype", "q3_x")
    assert_one_line_error(res, "q3_x")
    assert not (tmp_path / "o.gguf").exists()


def test_unmappable_tensor_is_named(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    f = next(ckpt.glob("*.safetensors"))
    tensors = load_file(f)
    tensors["vision_tower.encoder.layers.0.mystery.weight"] = tensors["vision_tower.pre_layrnorm.weight"]
    save_file(tensors, f)
    assert_one_line_error(convert(ckpt, tmp_path / "o.gguf"), "vision_tower.encoder.layers.0.mystery.weight")
    assert list(tmp_path.glob("*.gguf")) == []


def test_interrupted_write_leaves_nothing(llava_fixture, tmp_path, monkeypatch):
    """An error while streaming tensors removes the temporary file and writes no output."""
    from ggraft import mmproj
    from ggraft.checkpoint import Checkpoint
    from ggraft.converter import converter_for

    conv = converter_for(Checkpoint(llava_fixture / "hf"))
    calls = {"n": 0}
    real = conv.ckpt.load

    def failing(name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk vanished")
        return real(name)

    monkeypatch.setattr(conv.ckpt, "load", failing)
    with pytest.raises(OSError):
        mmproj.convert(conv, tmp_path / "o.gguf", "f32")
    assert list(tmp_path.iterdir()) == []


def test_version_and_help():
    import ggraft

    res = run_cli("--version")
    assert res.code == 0 and res.stdout.strip() == ggraft.__version__
    helped = run_cli("--help")
    assert helped.code == 0
    for command in ("convert", "verify", "check", "audit", "inspect", "graft", "run", "serve", "pack", "merge"):
        assert command in helped.stdout, command


def test_load_rows_bounds(llava_fixture):
    from ggraft.checkpoint import Checkpoint
    from ggraft.errors import InputError

    ckpt = Checkpoint(llava_fixture / "hf")
    name = "language_model.model.embed_tokens.weight"
    rows = ckpt.shape(name)[0]
    assert ckpt.load_rows(name, rows - 1).shape == (1, 96)
    for bad in (-1, rows):
        with pytest.raises(InputError, match="outside"):
            ckpt.load_rows(name, bad)


@pytest.mark.parametrize("args,needle", [
    (("convert",), "Missing argument"),
    (("convert", "x", "-o", "y", "--bogus"), "No such option"),
    (("frobnicate",), "No such command"),
])
def test_usage_errors_are_one_line(args, needle):
    assert_one_line_error(run_cli(*args), needle)
