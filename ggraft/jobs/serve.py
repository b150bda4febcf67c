"""``ggraft serve``: a pair behind an OpenAI-compatible HTTP API, for the chat clients people use.

llama-cpp-python's server does the HTTP: its FastAPI router (``/v1/chat/completions`` streaming
and not, ``/v1/models``, ...), its settings and API-key check; uvicorn runs it.  ggraft adds:

- the model is a ``Pair`` (``ggraft check`` first, llama.cpp's refusals in one line, the GGUF's
  chat template with the media marker, WebP and local-file images);
- images are checked before the request reaches the model, so a bad one gets HTTP 400 with a
  clear message, also for streaming requests (whose status line is otherwise sent before the
  image is read), and the server goes on serving;
- remote image URLs are refused (ggraft fetches nothing); local files are allowed when the server
  listens on a loopback address only, unless told otherwise.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from pathlib import Path
from typing import Any, Callable

from ggraft import compat
from ggraft.errors import InputError
from ggraft.pair.messages import image_bytes
from ggraft.pair.runtime import Pair


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def image_problem(body: bytes, allow_files: bool) -> str | None:
    """Why the images of a chat request cannot be used, or None (also for a body that is not
    JSON: the router reports that itself)."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    messages = request.get("messages") if isinstance(request, dict) else None
    n = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            n += 1
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                return f"image {n}: image_url has no url"
            try:
                image_bytes(url, allow_files=allow_files,
                            label=f"image {n} (data: URI)" if url.startswith("data:") else f"image {n} ({url})")
            except InputError as e:
                return e.message
    return None


class ImageCheck:
    """ASGI middleware: reads a chat request's body, answers 400 if an image is unusable, and
    otherwise hands the same body on to the router."""

    def __init__(self, app, allow_files: bool):
        self.app, self.allow_files = app, allow_files

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool

        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = await run_in_threadpool(image_problem, body, self.allow_files)  # decoding is not for the event loop
        if problem:
            error = {"message": problem, "type": "invalid_request_error", "param": "messages", "code": "invalid_image"}
            return await JSONResponse({"error": error}, status_code=400)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class _PairModels:
    """What llama-cpp-python's router asks of its model proxy: the Llama for a request (there is
    one, whatever the request's "model" says) and the model names for /v1/models."""

    def __init__(self, pair: Pair, alias: str):
        self.pair, self.alias = pair, alias

    def __call__(self, model: str | None = None):
        return self.pair.llama

    def __iter__(self):
        yield self.alias

    def free(self) -> None:
        self.pair.close()


def create_app(pair: Pair, *, alias: str, api_key: str | None = None, allow_files: bool = True):
    """The FastAPI app: llama-cpp-python's OpenAI-compatible router serving ``pair``."""
    from fastapi import FastAPI
    from fastapi.middleware import Middleware
    from llama_cpp.server import app as server
    from llama_cpp.server.settings import ServerSettings
    from starlette_context.middleware import RawContextMiddleware
    from starlette_context.plugins import RequestIdPlugin

    from ggraft import __version__

    # every field given, so that no environment variable (API_KEY, PORT, ...) changes the server;
    # requests queue instead of interrupting a streaming reply
    server.set_server_settings(ServerSettings(api_key=api_key, interrupt_requests=False, disable_ping_events=False,
                                              root_path="", ssl_keyfile=None, ssl_certfile=None))
    # llama-cpp-python's create_app() would load the model itself, through its own settings; the
    # router reads the model from a module-level proxy, so it is given the pair's Llama instead
    compat.serve_models(server, _PairModels(pair, alias))
    app = FastAPI(title="ggraft serve", version=__version__,
                  middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),)),
                              Middleware(ImageCheck, allow_files=allow_files)])
    app.include_router(server.router)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), or an InputError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, reuse_port=False)
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(text: str | Path, mmproj: str | Path, *, host: str = "127.0.0.1", port: int = 8080, alias: str | None = None,
          api_key: str | None = None, allow_files: bool | None = None, log_level: str = "info",
          on_ready: Callable[[str, Pair], Any] | None = None, **pair_options: Any) -> None:
    """Check and load the pair, then serve it until interrupted (Ctrl-C / SIGTERM).

    ``on_ready(url, pair)`` is called once the model is loaded and the socket listens.
    """
    import uvicorn

    sock = listen(host, port)  # a busy port fails before a model is loaded
    try:
        pair = Pair(text, mmproj, **pair_options)
        try:
            app = create_app(pair, alias=alias or Path(text).stem, api_key=api_key,
                             allow_files=is_loopback(host) if allow_files is None else allow_files)
            bound_host, bound_port = sock.getsockname()[:2]
            url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
            if on_ready:
                on_ready(f"http://{url_host}:{bound_port}/v1", pair)
            uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
        finally:
            pair.close()
    finally:
        sock.close()
