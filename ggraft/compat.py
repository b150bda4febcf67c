"""Every use of a dependency's private API, in one place, checked against the versions it was
written against.

ggraft leans on a few names its dependencies do not promise to keep: gguf-py's lazy-tensor
wrapper, llama-cpp-python's mtmd chat handler hooks, its server's module-level model proxy and
the way its ``Llama`` picks up default model parameters.  Each is used only through a function
of this module; before the first use the installed version is compared with ``WRITTEN_AGAINST``
and the name is looked up, so a different version fails in one line (``DependencyError``, exit
2) instead of deep inside a conversion or a request.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterator

from ggraft.errors import DependencyError

#: distribution -> the versions whose private names this module was read against
WRITTEN_AGAINST: dict[str, tuple[str, ...]] = {
    "gguf": ("0.19.0",),
    "llama_cpp_python": ("0.3.36",),
}

#: the private names used, by distribution (what a new version must still provide)
PRIVATE_NAMES: dict[str, tuple[str, ...]] = {
    "gguf": ("gguf.lazy.LazyNumpyTensor._wrap_fn",),
    "llama_cpp_python": (
        "llama_cpp.llama_chat_format.MTMDChatHandler._convert_message_for_template",
        "llama_cpp.llama_chat_format.MTMDChatHandler._init_mtmd_context",
        "llama_cpp.llama_chat_format.MTMDChatHandler._get_chat_template",
        "llama_cpp.llama_chat_format.MTMDChatHandler._create_bitmap_from_bytes",
        "llama_cpp.llama_chat_format.MTMDChatHandler._mtmd_cpp",
        "llama_cpp.server.app._llama_proxy",
        "llama_cpp.llama_cpp.llama_model_default_params (read by Llama.__init__)",
    ),
}


def installed_version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def version_problem(distribution: str, installed: str | None) -> str | None:
    """Why ``installed`` (a version string, None: not installed) is not one ggraft was written
    against, or None."""
    tested = WRITTEN_AGAINST[distribution]
    if installed in tested:
        return None
    what = "is not installed" if installed is None else f"{installed} is installed"
    return (f"{distribution} {what}, but ggraft uses private parts of it written against "
            f"{distribution} {' / '.join(tested)} ({', '.join(PRIVATE_NAMES[distribution])})")


@functools.cache
def require(distribution: str) -> None:
    """Raise DependencyError unless the installed ``distribution`` is one ggraft was written against."""
    problem = version_problem(distribution, installed_version(distribution))
    if problem:
        pinned = WRITTEN_AGAINST[distribution][-1]
        raise DependencyError(problem, hint=f"pip install '{distribution.replace('_', '-')}=={pinned}'")


def _private(owner: Any, name: str, distribution: str) -> Any:
    require(distribution)
    try:
        return getattr(owner, name)
    except AttributeError:
        raise DependencyError(f"{getattr(owner, '__name__', owner)}.{name} is missing from the installed "
                              f"{distribution}, although its version is one ggraft was written against") from None


# -- gguf-py ---------------------------------------------------------------------------------
def lazy_map(fn: Callable, meta_noop: Any) -> Callable:
    """gguf-py's ``LazyNumpyTensor._wrap_fn(fn, meta_noop=...)``: ``fn`` applied lazily to a lazy
    tensor, the result's dtype (and shape) described by ``meta_noop`` without computing it."""
    from gguf.lazy import LazyNumpyTensor

    return _private(LazyNumpyTensor, "_wrap_fn", "gguf")(fn, meta_noop=meta_noop)


# -- llama-cpp-python ------------------------------------------------------------------------
def message_for_template(message: dict[str, Any], media_marker: str) -> dict[str, Any]:
    """A chat message as llama-cpp-python's mtmd handler hands it to the template (each image
    part replaced by a text part holding ``media_marker``)."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    return _private(MTMDChatHandler, "_convert_message_for_template", "llama_cpp_python")(message, media_marker)


@functools.cache
def mtmd_chat_handler() -> type:
    """llama-cpp-python's ``MTMDChatHandler`` with its private hooks as public methods, for
    subclasses to override: ``chat_template(llama)``, ``bitmap_from_bytes(raw)``, ``mtmd`` (the
    bindings module the handler calls) and ``init_context(llama)``."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    for name in ("_init_mtmd_context", "_get_chat_template", "_create_bitmap_from_bytes", "load_image"):
        _private(MTMDChatHandler, name, "llama_cpp_python")

    class Handler(MTMDChatHandler):
        def __init__(self, *args: Any, **kw: Any):
            super().__init__(*args, **kw)
            _private(self, "_mtmd_cpp", "llama_cpp_python")

        @property
        def mtmd(self):
            return self._mtmd_cpp

        @mtmd.setter
        def mtmd(self, bindings) -> None:
            self._mtmd_cpp = bindings

        def chat_template(self, llama) -> str:
            return MTMDChatHandler._get_chat_template(self, llama)

        def bitmap_from_bytes(self, raw: bytes):
            return MTMDChatHandler._create_bitmap_from_bytes(self, raw)

        def init_context(self, llama) -> None:
            self._init_mtmd_context(llama)

        def _get_chat_template(self, llama) -> str:
            return self.chat_template(llama)

        def _create_bitmap_from_bytes(self, raw: bytes):
            return self.bitmap_from_bytes(raw)

    return Handler


def serve_models(server_app_module: Any, models: Any) -> None:
    """Make llama-cpp-python's server router take its models from ``models`` (its module-level
    ``_llama_proxy``, which its own ``create_app`` would fill from its settings)."""
    _private(server_app_module, "_llama_proxy", "llama_cpp_python")
    server_app_module._llama_proxy = models


_DEFAULT_PARAMS_LOCK = threading.Lock()


@contextmanager
def _default_model_params(params) -> Iterator[None]:
    import llama_cpp.llama_cpp as bindings

    original = _private(bindings, "llama_model_default_params", "llama_cpp_python")
    with _DEFAULT_PARAMS_LOCK:
        bindings.llama_model_default_params = lambda: type(params).from_buffer_copy(params)
        try:
            yield
        finally:
            bindings.llama_model_default_params = original


def llama_with_model_params(params, model_path: str, **kwargs: Any):
    """``llama_cpp.Llama(model_path, **kwargs)`` loaded with ``params`` (a ``llama_model_params``)
    as its defaults: ``Llama`` sets only the fields it has arguments for (GPU layers, mmap, ...)
    and keeps the others (``use_extra_bufts``), which it has no argument for."""
    import llama_cpp

    with _default_model_params(params):
        llama = llama_cpp.Llama(model_path=model_path, **kwargs)
    if bool(llama.model_params.use_extra_bufts) != bool(params.use_extra_bufts):
        llama.close()
        raise DependencyError("llama-cpp-python's Llama did not take ggraft's model parameters "
                              f"(use_extra_bufts); written against llama_cpp_python "
                              f"{' / '.join(WRITTEN_AGAINST['llama_cpp_python'])}")
    return llama
