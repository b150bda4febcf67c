"""``ggraft.Pair``: a text GGUF and an mmproj GGUF, run together by llama-cpp-python.

The pair is checked before anything is handed to llama.cpp; llama.cpp's own refusals are
reported in one line from its captured log.  Prompts go through the text GGUF's chat template
(``tokenizer.chat_template``) with llama.cpp's media marker where the images go, as llama-server
does; without a template the text is sent plain (with a warning), and ``raw`` sends it as is.

>>> pair = Pair("text.gguf", "mmproj.gguf")
>>> pair.describe("cat.png", "What is in the picture?")
>>> reply = pair.generate(user_messages(["a.png", "b.jpg"], "Compare them."), max_tokens=64)
>>> for piece in reply: print(piece, end="")
>>> reply.timings.to_dict()   # image encode ms, prompt ms, tokens/s
"""
from __future__ import annotations

import ctypes
import io
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import jinja2

from ggraft.pair import engine
from ggraft.errors import EngineError, IncompatibleError, InputError
from .messages import first_line, image_bytes, user_messages

# Jinja run by llama-cpp-python's handler (trim_blocks: newlines are written as expressions).
# By then every image part has become a text part holding the media marker.
_CONTENT = "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}" \
           "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
PLAIN_TEMPLATE = "{% for m in messages %}" + _CONTENT + "{{ '\\n' }}{% endfor %}"
RAW_TEMPLATE = "{% for m in messages %}" + _CONTENT + "{% endfor %}"


def _refuse(report, ignore: tuple[str, ...] = ()):
    errors = [f for f in report.findings if f.severity == "error" and not f.code.startswith(ignore)]
    if errors:
        raise IncompatibleError(errors[0].message, hint=errors[0].hint)
    return report


def preflight(text: str | Path, mmproj: str | Path, raw: bool = False):
    """Refuse a pair llama.cpp would reject or crash on, before it is loaded; returns the CheckReport.
    With ``raw`` the chat template is not used, so its findings do not refuse the pair."""
    from .check import check_pair

    return _refuse(check_pair(text, mmproj), ("chat-template",) if raw else ())


def preflight_mmproj(mmproj: str | Path):
    """Refuse an mmproj llama.cpp would reject or crash on (the mmproj half of ``preflight``)."""
    from .check import check_mmproj

    return _refuse(check_mmproj(mmproj))


def _engine_error(prefix: str, exc: BaseException) -> EngineError:
    """llama.cpp's logged reason in one line; its own "hint:" becomes the error's hint."""
    reason = engine.log_reason(first_line(exc))
    message, _, hint = reason.partition(" hint: ")
    return EngineError(f"{prefix}: {message}", hint=hint or None)


class _TimedMtmd:
    """llama-cpp-python's ``mtmd_cpp`` module as the handler sees it, with the evaluation of an image
    chunk done in llama.cpp's own two steps (mtmd_helper_eval_chunk_single = mtmd_encode_chunk +
    mtmd_helper_decode_image_chunk) so that the vision encoder's time can be measured."""

    def __init__(self, mtmd):
        self._mtmd = mtmd
        self.reset()

    def reset(self) -> None:
        self.encode_ms, self.images, self.prompt_done = 0.0, 0, 0.0

    def __getattr__(self, name: str):
        return getattr(self._mtmd, name)

    def mtmd_input_chunks_free(self, chunks) -> None:
        """The handler frees the chunks once every one is in the KV cache: the prompt is done."""
        self.prompt_done = time.perf_counter()
        self._mtmd.mtmd_input_chunks_free(chunks)

    def mtmd_helper_eval_chunk_single(self, ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past):
        m = self._mtmd
        if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            return m.mtmd_helper_eval_chunk_single(ctx, lctx, chunk, n_past, seq_id, n_batch, logits_last, new_n_past)
        start = time.perf_counter()
        result = m.mtmd_encode_chunk(ctx, chunk)
        self.encode_ms += (time.perf_counter() - start) * 1000
        self.images += 1
        if result != 0:
            return result
        return m.mtmd_helper_decode_image_chunk(ctx, lctx, chunk, m.mtmd_get_output_embd(ctx), n_past, seq_id,
                                                n_batch, new_n_past, m.mtmd_helper_post_decode_callback(), None)


def _handler_class():
    from ggraft import compat

    class Handler(compat.mtmd_chat_handler()):
        """llama-cpp-python's mtmd chat handler with ggraft's template choice, image loading
        (data: URIs and local files, PNG/JPEG/WebP, one-line errors) and encode timing."""

        template = PLAIN_TEMPLATE
        allow_files = True

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.mtmd = self.timer = _TimedMtmd(self.mtmd)

        def chat_template(self, llama) -> str:
            return self.template

        def load_image(self, image_url: str) -> bytes:
            return image_bytes(image_url, allow_files=self.allow_files, decode=False)

        def bitmap_from_bytes(self, raw: bytes):
            if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":  # llama.cpp's decoder (stb_image) has no WebP
                return self._bitmap_from_pixels(raw)
            bitmap = None
            try:
                bitmap = super().bitmap_from_bytes(raw)
            except ValueError:
                pass
            if not bitmap:
                raise InputError(f"llama.cpp could not decode the image: {engine.log_reason('unreadable image data')}")
            return bitmap

        def _bitmap_from_pixels(self, raw: bytes):
            import numpy as np
            from PIL import Image

            with Image.open(io.BytesIO(raw)) as im:
                rgb = np.ascontiguousarray(im.convert("RGB"), dtype=np.uint8)
            h, w, _ = rgb.shape
            return self.mtmd.mtmd_bitmap_init(w, h, (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb))

    return Handler


@dataclass
class Timings:
    """Wall-clock phases of one reply.  ``image_encode_ms`` is the vision encoder (mmproj);
    ``prompt_ms`` the rest of the prompt's processing (image loading, template, tokenizing,
    decoding the text and image tokens into the KV cache); ``generation_ms`` the tokens after it."""

    image_encode_ms: float = 0.0
    prompt_ms: float = 0.0
    generation_ms: float = 0.0
    images: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / (self.generation_ms / 1000) if self.generation_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return out | {"tokens_per_s": round(self.tokens_per_s, 2)}


class Generation:
    """One reply: iterate for its text pieces (as they are generated when streaming, in one piece
    otherwise); once iterated, ``.text``, ``.finish_reason`` and ``.timings`` are complete."""

    def __init__(self, llama, result, timings: Timings, started: float, stream: bool):
        self._llama, self._started, self._stream = llama, started, stream
        self._chunks = result if stream else iter([self._as_chunk(result)])
        self.timings = timings
        self.finish_reason: str | None = None
        self._pieces: list[str] = []
        if not stream:  # generation is over already; the response counts its tokens
            timings.generation_ms = (time.perf_counter() - started) * 1000
            timings.generated_tokens = result["usage"]["completion_tokens"]

    @staticmethod
    def _as_chunk(response: dict[str, Any]) -> dict[str, Any]:
        choice = response["choices"][0]
        return {"choices": [{"delta": {"content": choice["message"].get("content")},
                             "finish_reason": choice.get("finish_reason")}]}

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        while True:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                if self._stream:
                    self._finish_stream()
                raise
            except (ValueError, RuntimeError) as e:
                raise _engine_error("llama.cpp failed while generating", e) from None
            choice = chunk["choices"][0]
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            piece = choice["delta"].get("content") or ""
            if piece:
                self._pieces.append(piece)
                return piece

    def _finish_stream(self) -> None:
        t = self.timings
        t.generation_ms = (time.perf_counter() - self._started) * 1000
        # every generated token is decoded except the last one when the reply hit max_tokens
        t.generated_tokens = self._llama.n_tokens - t.prompt_tokens + (self.finish_reason == "length")

    def read(self) -> str:
        """The whole reply."""
        for _ in self:
            pass
        return self.text


class Pair:
    """A text model and its mmproj, loaded in llama.cpp.

    ``raw`` sends the messages' text as is instead of through the chat template.  ``warnings``
    lists what the user should know (``ggraft check``'s warnings, no chat template, no GPU).
    ``check=False`` skips the pair check but never the mmproj's (llama.cpp would crash on what it
    refuses); ``extra_bufts`` overrides ``engine.text_model_params``' choice (None: automatic).
    """

    def __init__(self, text: str | Path, mmproj: str | Path, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_gpu_layers: int = 0, mmproj_cpu: bool = False, seed: int = 0, check: bool = True,
                 raw: bool = False, extra_bufts: bool | None = None):
        import llama_cpp

        self.text, self.mmproj = Path(text), Path(mmproj)
        self.warnings: list[str] = []
        started = time.perf_counter()
        report = preflight(self.text, self.mmproj, raw) if check else preflight_mmproj(self.mmproj)
        self.warnings += [f.message for f in report.findings if f.severity == "warning"]
        if n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
            self.warnings.append("llama-cpp-python was built without GPU support; running on the CPU")
        if n_ctx > 0:  # llama.cpp pads the context to a multiple of 256; llama-cpp-python must size it alike
            n_ctx = -(-n_ctx // 256) * 256
        engine._install_log_capture()
        engine.clear_log()
        try:
            self.handler = _handler_class()(str(self.mmproj), verbose=False, use_gpu=not mmproj_cpu)
            self.llama = engine.open_llama(self.text, extra_bufts=extra_bufts, chat_handler=self.handler, n_ctx=n_ctx,
                                           n_threads=n_threads or os.cpu_count(), n_gpu_layers=n_gpu_layers,
                                           seed=seed, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise _engine_error(f"{self.text}: llama.cpp could not load the text model", e) from None
        engine.clear_log()
        try:
            self.handler.init_context(self.llama)
        except (ValueError, RuntimeError) as e:
            raise _engine_error(f"{self.mmproj}: llama.cpp refused the mmproj", e) from None
        self.template = "raw" if raw else "gguf" if self.llama.metadata.get("tokenizer.chat_template") else "plain"
        self.handler.template = {"raw": RAW_TEMPLATE, "plain": PLAIN_TEMPLATE}.get(
            self.template, self.llama.metadata.get("tokenizer.chat_template"))
        if self.template == "plain":
            self.warnings.append(f"{self.text} has no chat template (tokenizer.chat_template); sending a plain prompt")
        self.load_ms = (time.perf_counter() - started) * 1000

    def generate(self, messages: list[dict[str, Any]], *, stream: bool = True, max_tokens: int = 128,
                 temperature: float = 0.2, top_p: float = 0.95, seed: int | None = None, **options: Any) -> Generation:
        """Run the prompt (images included) and return the reply as a Generation: when streaming,
        its tokens are generated as it is iterated (llama-cpp-python's streaming re-detokenizes as
        it goes, so the non-streaming path is the faster one for a whole reply).

        ``options`` go to llama-cpp-python's ``create_chat_completion`` (top_k, stop, logit_bias, ...).
        """
        timer = self.handler.timer
        timer.reset()
        started = time.perf_counter()
        engine.clear_log()
        try:
            result = self.llama.create_chat_completion(messages=messages, stream=stream, max_tokens=max_tokens,
                                                       temperature=temperature, top_p=top_p, seed=seed, **options)
        except (ValueError, RuntimeError) as e:
            if "exceed" in str(e):  # llama-cpp-python: "Prompt exceeds n_ctx: 5000 > 4096"
                raise InputError(f"the prompt does not fit the context: {first_line(e)}",
                                 "give a larger context (--ctx) or a shorter prompt") from None
            raise _engine_error("llama.cpp failed", e) from None
        except (TypeError, jinja2.TemplateError) as e:  # raised inside the GGUF's Jinja chat template (e.g. it concatenates list content)
            raise InputError(f"{self.text}: its chat template fails on these messages ({first_line(e)})",
                             "send the prompt as is with --raw, or use a template that renders image parts") from None
        prompt_done = timer.prompt_done or time.perf_counter()
        timings = Timings(image_encode_ms=timer.encode_ms, images=timer.images,
                          prompt_ms=(prompt_done - started) * 1000 - timer.encode_ms,
                          prompt_tokens=result["usage"]["prompt_tokens"] if not stream else self.llama.n_tokens)
        return Generation(self.llama, result, timings, prompt_done, stream)

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False, **options: Any) -> Iterator[str] | str:
        """OpenAI-style messages (``image_url`` parts allowed) → the reply, or its pieces when streaming."""
        reply = self.generate(messages, stream=stream, **options)
        return reply if stream else reply.read()

    def describe(self, image: str | Path, prompt: str, *, system: str | None = None, **options: Any) -> Iterator[str] | str:
        """Ask ``prompt`` about one image file."""
        return self.chat(user_messages([image], prompt, system), **options)

    def close(self) -> None:
        self.llama.close()

    def __enter__(self) -> "Pair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
