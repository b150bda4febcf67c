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
    from ggraft.mmproj import writer as mmproj
    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.mmproj.converter import converter_for

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
    from ggraft.hf.checkpoint import Checkpoint
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


# -- the error funnel and the help (issue 13) ------------------------------------------------
def test_unknown_command_hint_names_the_program_once():
    res = run_cli("frobnicate")
    assert_one_line_error(res, "No such command 'frobnicate'", "see 'ggraft --help'")
    assert "ggraft ggraft" not in res.stderr
    assert_one_line_error(run_cli("convert"), "see 'ggraft convert --help'")


def test_help_reads_well():
    import re

    res = run_cli("--help")
    assert res.code == 0 and "<bool>" not in res.stdout
    rows = re.findall(r"^│ (\w+)? +(.*?) *│$", res.stdout.split("Commands")[1], flags=re.M)
    names = [name for name, _ in rows if name]
    assert names == sorted(names) and {"audit", "check", "convert", "graft", "inspect", "merge", "pack", "run",
                                       "serve", "verify"} <= set(names), names
    # each command's line is one sentence: its continuation lines continue it, none starts a new one
    entries = " ".join(f"\n{name} {text}" if name else text for name, text in rows).strip().split("\n")
    assert all(e.rstrip().endswith(".") and e.rstrip().count(". ") == 0 for e in entries), entries
    for command in ("convert", "run", "check", "pack", "merge"):
        helped = run_cli(command, "--help")
        assert helped.code == 0 and "<bool>" not in helped.stdout and "list[Path]" not in helped.stdout, command
    assert run_cli().code == 0  # no arguments: the help, not an error


def test_help_into_a_closed_pipe_is_quiet():
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("ggraft")
    for args in ("--help", "convert --help"):
        p = subprocess.run(f"'{exe}' {args} | head -1", shell=True, capture_output=True, text=True, timeout=60)
        assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr and "Error" not in p.stderr, p.stderr


def test_unexpected_exception_is_one_line_naming_a_bug(monkeypatch, capsys):
    from ggraft.cli.main import run
    from ggraft.jobs import audit

    def broken(path):
        raise ValueError("something [bold]odd[/]\nsecond line")

    monkeypatch.setattr(audit, "audit", broken)
    monkeypatch.delenv("GGRAFT_DEBUG", raising=False)
    assert run(["audit", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["Error: unexpected ValueError: something [bold]odd[/]",
                   "Hint: this is a bug in ggraft; rerun with GGRAFT_DEBUG=1 to see the traceback"], err
    monkeypatch.setenv("GGRAFT_DEBUG", "1")
    with pytest.raises(ValueError):
        run(["audit", "x"])


def test_error_text_is_never_markup(capsys):
    from ggraft.cli.main import run

    assert run(["inspect", "nope[/b] [bold]:cat:.gguf"]) == 2
    assert capsys.readouterr().err == "Error: nope[/b] [bold]:cat:.gguf: no such file\n"


def test_the_funnel_uses_only_typers_public_names():
    from pathlib import Path

    import ggraft.cli.main as main

    source = Path(main.__file__).read_text()
    assert "typer._click" not in source and "click_exceptions" not in source


def test_python_warnings_are_one_line(monkeypatch, capsys):
    import warnings

    from ggraft.cli.main import run
    from ggraft.jobs import audit

    def warns(path):
        warnings.warn("careful\nnow", RuntimeWarning)
        raise ggraft_input_error("stop")

    from ggraft.errors import InputError as ggraft_input_error
    monkeypatch.setattr(audit, "audit", warns)
    assert run(["audit", "x"]) == 2
    assert capsys.readouterr().err == "Warning: careful\\nnow\nError: stop\n"


def test_system_errors_are_one_line_without_bug_hint(monkeypatch, capsys):
    from ggraft.cli.main import run
    from ggraft.jobs import audit

    def full(path):
        raise OSError(28, "No space left on device", "/out/x.gguf")

    monkeypatch.setattr(audit, "audit", full)
    assert run(["audit", "x"]) == 2
    assert capsys.readouterr().err == "Error: /out/x.gguf: No space left on device\n"
