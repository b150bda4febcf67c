"""``ggraft.Pair``: a text GGUF and an mmproj GGUF, run together by llama-cpp-python.

The pair is checked before anything is handed to llama.cpp; llama.cpp's own refusals are
reported in one line from its captured log.
"""
from __future__ import annotations

import base64
import io
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from . import engine
from .errors import EngineError, IncompatibleError, InputError

IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}\n{% endfor %}"
)


def image_data_uri(path: str | Path) -> str:
    """A PNG/JPEG/WebP file as a data: URI, after checking that it decodes."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read image: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if fmt not in IMAGE_FORMATS:
        raise InputError(f"{path}: image format {fmt} is not supported; use PNG, JPEG or WebP")
    return f"data:{IMAGE_FORMATS[fmt]};base64,{base64.b64encode(raw).decode()}"


def preflight(text: str | Path, mmproj: str | Path) -> None:
    """Refuse a pair llama.cpp would reject or crash on, before it is loaded."""
    from .check import check_pair

    report = check_pair(text, mmproj)
    if not report.ok:
        first = next(f for f in report.findings if f.severity == "error")
        raise IncompatibleError(first.message, hint=first.hint)


def _handler_class():
    from llama_cpp.llama_chat_format import MTMDChatHandler

    class Handler(MTMDChatHandler):
        """llama-cpp-python's mtmd chat handler, with a plain fallback when the GGUF has no template."""

        raw = False

        def _get_chat_template(self, llama_model):
            if self.raw:
                return PLAIN_TEMPLATE
            template = llama_model.metadata.get("tokenizer.chat_template")
            if isinstance(template, str) and template:
                return template
            warnings.warn("the text GGUF has no chat template; sending a plain prompt", stacklevel=2)
            return PLAIN_TEMPLATE

    return Handler


class Pair:
    """A text model and its mmproj, loaded in llama.cpp.

    >>> pair = Pair("text.gguf", "mmproj.gguf")
    >>> pair.describe("cat.png", "What is in the picture?")
    """

    def __init__(self, text: str | Path, mmproj: str | Path, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_gpu_layers: int = 0, mmproj_cpu: bool = False, seed: int = 0, check: bool = True,
                 raw: bool = False):
        from llama_cpp import Llama

        self.text, self.mmproj = Path(text), Path(mmproj)
        if check:
            preflight(self.text, self.mmproj)
        engine._install_log_capture()
        self.handler = _handler_class()(str(self.mmproj), verbose=False, use_gpu=not mmproj_cpu)
        self.handler.raw = raw
        engine.clear_log()
        try:
            self.llama = Llama(model_path=str(self.text), chat_handler=self.handler, n_ctx=n_ctx,
                               n_threads=n_threads or os.cpu_count(), n_gpu_layers=n_gpu_layers,
                               seed=seed, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"{self.text}: llama.cpp could not load the text model: {engine.log_reason(str(e))}") from None
        engine.clear_log()
        try:
            self.handler._init_mtmd_context(self.llama)
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"{self.mmproj}: llama.cpp refused the mmproj: {engine.log_reason(str(e))}") from None

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, max_tokens: int = 128,
             temperature: float = 0.2, top_p: float = 0.95, seed: int | None = None) -> Iterator[str] | str:
        """OpenAI-style messages (``image_url`` parts allowed) → the reply, or its pieces when streaming."""
        engine.clear_log()
        try:
            result = self.llama.create_chat_completion(messages=messages, stream=stream, max_tokens=max_tokens,
                                                       temperature=temperature, top_p=top_p, seed=seed)
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"llama.cpp failed: {engine.log_reason(str(e))}") from None
        if not stream:
            return result["choices"][0]["message"]["content"] or ""
        return (chunk["choices"][0]["delta"].get("content") or "" for chunk in result)

    def describe(self, image: str | Path, prompt: str, *, system: str | None = None, **kw: Any) -> Iterator[str] | str:
        """Ask ``prompt`` about one image file."""
        return self.chat(user_messages([image], prompt, system), **kw)


def user_messages(images: list[str | Path], prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": image_data_uri(p)}} for p in images]
    content.append({"type": "text", "text": prompt})
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]

