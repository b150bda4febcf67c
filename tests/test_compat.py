"""ggraft.compat: the one home of every use of a dependency's private API, checked against the
versions it was written against; any other version fails in one line, exit 2."""
from __future__ import annotations

import importlib
import inspect
import re
import types

import numpy as np
import pytest

from conftest import ROOT
from ggraft import compat
from ggraft.errors import DependencyError


@pytest.fixture
def other_versions(monkeypatch):
    """The installed gguf and llama-cpp-python reported as versions ggraft was not written against."""
    compat.require.cache_clear()
    monkeypatch.setattr(compat, "installed_version", lambda dist: {"gguf": "0.20.0"}.get(dist, "0.4.0"))
    yield
    compat.require.cache_clear()


def test_the_installed_versions_are_the_ones_written_against():
    for dist in compat.WRITTEN_AGAINST:
        assert compat.version_problem(dist, compat.installed_version(dist)) is None
        compat.require(dist)


def owner_of(dotted: str) -> tuple[object, str]:
    """The object holding a dotted private name (its longest importable module, then attributes)."""
    parts = dotted.split(" ")[0].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    for attr in parts[cut:-1]:
        owner = getattr(owner, attr)
    return owner, parts[-1]


def test_every_private_name_exists_in_the_installed_versions():
    for names in compat.PRIVATE_NAMES.values():
        for dotted in names:
            owner, name = owner_of(dotted)
            if isinstance(owner, type) and not hasattr(owner, name):  # an instance attribute its __init__ sets
                assert f"self.{name} =" in inspect.getsource(owner.__init__), dotted
            else:
                assert hasattr(owner, name), dotted


def test_another_version_is_named_in_one_line():
    problem = compat.version_problem("llama_cpp_python", "0.4.0")
    assert "llama_cpp_python 0.4.0 is installed" in problem and "0.3.36" in problem and "_llama_proxy" in problem
    assert "\n" not in problem
    assert "is not installed" in compat.version_problem("gguf", None)


def test_each_use_checks_the_version(other_versions):
    with pytest.raises(DependencyError, match="gguf 0.20.0 is installed.*0.19.0") as caught:
        compat.lazy_map(lambda x: x, meta_noop=np.float32)
    assert caught.value.hint == "pip install 'gguf==0.19.0'"
    for use in (lambda: compat.message_for_template({"role": "user", "content": "hi"}, "<m>"),
                compat.mtmd_chat_handler.__wrapped__,
                lambda: compat.serve_models(types.SimpleNamespace(_llama_proxy=None), object())):
        with pytest.raises(DependencyError, match="llama-cpp-python|llama_cpp_python 0.4.0"):
            use()


def test_a_missing_private_name_is_named(monkeypatch):
    with pytest.raises(DependencyError, match="_llama_proxy is missing"):
        compat.serve_models(types.SimpleNamespace(), object())


def test_lazy_map_applies_lazily():
    from gguf.lazy import LazyNumpyTensor

    from ggraft.mmproj.converter import in_memory

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    lazy = compat.lazy_map(lambda a: a.astype(np.float16) * 2, meta_noop=np.float16)(in_memory(values))
    assert lazy.dtype == np.float16 and lazy.shape == (2, 3)
    assert np.array_equal(LazyNumpyTensor.to_eager(lazy), (values * 2).astype(np.float16))


def test_message_for_template_puts_the_marker_where_the_image_was():
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                           {"type": "text", "text": "hi"}]}
    assert compat.message_for_template(message, "<__media__>")["content"] == [
        {"type": "text", "text": "<__media__>"}, {"type": "text", "text": "hi"}]


def test_the_handler_hooks_are_public(tmp_path):
    mmproj = tmp_path / "m.gguf"
    mmproj.write_bytes(b"")  # the handler only checks that the path exists

    class Mine(compat.mtmd_chat_handler()):
        def chat_template(self, llama) -> str:
            return "mine"

    handler = Mine(str(mmproj), verbose=False)
    assert handler._get_chat_template(None) == "mine"  # what llama-cpp-python calls
    bindings = handler.mtmd
    handler.mtmd = "wrapped"
    assert handler._mtmd_cpp == "wrapped" and bindings.__name__ == "llama_cpp.mtmd_cpp"


def test_serve_models_sets_the_routers_proxy():
    server = types.SimpleNamespace(_llama_proxy=None)
    models = object()
    compat.serve_models(server, models)
    assert server._llama_proxy is models


def test_the_cli_says_it_in_one_line(other_versions, llava_fixture, tmp_path, capsys):
    from ggraft.cli.main import main

    with pytest.raises(SystemExit) as done:
        main(["convert", str(llava_fixture / "hf"), "-o", str(tmp_path / "m.gguf")])  # f16: gguf-py's lazy map
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("Error: gguf 0.20.0 is installed"), err
    assert [ln.split(":")[0] for ln in err.splitlines()] == ["Error", "Hint"] and not (tmp_path / "m.gguf").exists()


PRIVATE_ATTRIBUTES = re.compile(r"\._wrap_fn\b|_convert_message_for_template|_init_mtmd_context|_llama_proxy|"
                                r"_get_chat_template|_create_bitmap_from_bytes|_mtmd_cpp\b|typer\._click")


def test_no_private_name_outside_compat():
    users = [str(p.relative_to(ROOT)) for p in (ROOT / "ggraft").rglob("*.py")
             if p.name != "compat.py" and PRIVATE_ATTRIBUTES.search(p.read_text())]
    assert users == []
