"""What a user hands ``Pair`` besides the prompt: images (a ``data:`` URI, a ``file://`` URL or a
path; PNG, JPEG or WebP, decoded once so a damaged file is refused here rather than inside
llama.cpp; nothing remote is fetched) and the user message that places them in the prompt at
llama.cpp's media marker."""
from __future__ import annotations

import base64
import binascii
import functools
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from ggraft.errors import InputError, input_file

IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@functools.cache
def media_marker() -> str:
    """The text llama.cpp replaces with an image's embeddings (``<__media__>``)."""
    from llama_cpp import mtmd_cpp

    return mtmd_cpp.mtmd_default_marker().decode()


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def image_bytes(source: str | Path, *, allow_files: bool = True, decode: bool = True, label: str | None = None) -> bytes:
    """The bytes of a PNG/JPEG/WebP image given as a ``data:`` URI, a ``file://`` URL or a path.

    With ``decode`` the pixels are decoded once, so a truncated or corrupt file is refused here
    rather than inside llama.cpp.  Remote URLs are refused: ggraft fetches nothing.
    """
    return _read_image(str(source), allow_files, decode, label)[0]


def image_data_uri(path: str | Path) -> str:
    """A PNG/JPEG/WebP file as a data: URI, after checking that it decodes."""
    raw, fmt = _read_image(str(path), True, True, None)
    return f"data:{IMAGE_FORMATS[fmt]};base64,{base64.b64encode(raw).decode()}"


def _read_image(source: str, allow_files: bool, decode: bool, label: str | None) -> tuple[bytes, str]:
    from PIL import Image, UnidentifiedImageError

    if source.startswith("data:"):
        label = label or "image (data: URI)"
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InputError(f"{label}: a data: URI must be base64 ('data:image/png;base64,...')")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{label}: the data: URI is not valid base64") from None
    else:
        url = urlparse(source)
        if url.scheme in ("http", "https", "ftp"):
            raise InputError(f"{label or source}: remote image URLs are not fetched; send the image as a data: URI or a local file")
        path = Path(unquote(url.path)) if url.scheme == "file" else Path(source)
        label = label or str(path)
        if not allow_files:
            raise InputError(f"{label}: local image files are not served on this address; send a data: URI")
        try:
            raw = input_file(path, "PNG, JPEG or WebP image").read_bytes()  # only regular files: a FIFO would block
        except InputError as e:
            raise InputError(f"{label}: cannot read image: {e.message.removeprefix(f'{path}: ')}") from None
        except OSError as e:
            raise InputError(f"{label}: cannot read image: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt = im.format
            if decode and fmt in IMAGE_FORMATS:
                im.load()
    except UnidentifiedImageError:
        raise InputError(f"{label}: not a readable image (unknown or damaged format)") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise InputError(f"{label}: not a readable image ({first_line(e)})") from None
    if fmt not in IMAGE_FORMATS:
        raise InputError(f"{label}: image format {fmt} is not supported; use PNG, JPEG or WebP")
    return raw, fmt


def user_messages(images: list[str | Path], prompt: str, system: str | None = None) -> list[dict[str, Any]]:
    """One user message with the images and the prompt (plus a system message).

    The images go where the prompt has the media marker (``<__media__>``), else before the text.
    """
    marker = media_marker()
    parts = [{"type": "image_url", "image_url": {"url": image_data_uri(p)}} for p in images]
    pieces = prompt.split(marker)
    if len(pieces) == 1:
        content: list[dict[str, Any]] = parts + [{"type": "text", "text": prompt}]
    elif len(pieces) - 1 != len(images):
        raise InputError(f"the prompt has {len(pieces) - 1} {marker} marker(s) but {len(images)} image(s) were given")
    else:
        content = []
        for i, text in enumerate(pieces):
            content += [{"type": "text", "text": text}] if text else []
            content += parts[i:i + 1]
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]
