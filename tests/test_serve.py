"""`ggraft serve`: the real `openai` client against the tiny LLaVA pair on 127.0.0.1.

The server runs as a user would start it (a subprocess on a free port, stopped at the end); only
loopback traffic (the client ignores proxy settings)."""
from __future__ import annotations

import base64
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT

openai = pytest.importorskip("openai")

SAMPLE = ROOT / "fixtures" / "sample.png"
GREEDY = {"temperature": 0.0, "max_tokens": 6, "seed": 1}


def data_uri(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def ask(url: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def server(llava_fixture, llava_mmproj):
    """The URL of a running `ggraft serve` (port 0: the server picks a free port and says which)."""
    exe = Path(sys.executable).with_name("ggraft")
    proc = subprocess.Popen([str(exe), "serve", llava_fixture / "text.gguf", llava_mmproj, "--port", "0",
                             "--alias", "tiny-llava"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def drain() -> None:  # keeps reading so that the server never blocks on a full pipe
        for line in proc.stderr:
            log.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        url = None
        while url is None:
            line = lines.get(timeout=120)
            assert line is not None, f"ggraft serve exited ({proc.poll()}): {''.join(log)}"
            if line.startswith("Serving "):
                url = line.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:"), url
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    http = openai.DefaultHttpxClient(trust_env=False)  # loopback only: no proxy from the environment
    yield openai.OpenAI(base_url=server, api_key="unused", timeout=60, max_retries=0, http_client=http)
    http.close()


def test_models_lists_the_pair(client):
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]


def test_image_request_returns_a_completion(client):
    reply = client.chat.completions.create(model="tiny-llava", messages=ask(data_uri(SAMPLE.read_bytes())), **GREEDY)
    text_only = client.chat.completions.create(
        model="tiny-llava", messages=[{"role": "user", "content": "What is in the picture?"}], **GREEDY)
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == GREEDY["max_tokens"]
    # the image's embeddings took their places in the prompt
    assert reply.usage.prompt_tokens > text_only.usage.prompt_tokens + 10


def test_local_file_and_data_uri_give_the_same_reply(client):
    replies = {client.chat.completions.create(model="tiny-llava", messages=ask(url), **GREEDY).choices[0].message.content
               for url in (data_uri(SAMPLE.read_bytes()), str(SAMPLE), SAMPLE.as_uri())}
    assert len(replies) == 1, replies


def test_streaming(client):
    stream = client.chat.completions.create(model="tiny-llava", messages=ask(str(SAMPLE)), stream=True, **GREEDY)
    pieces, finish = [], None
    for chunk in stream:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    # (the tiny model's output is random bytes, which llama-cpp-python decodes token by token when
    # streaming and all at once otherwise, so the two texts are not compared)
    assert len([p for p in pieces if p]) > 1
    assert finish == "length"


@pytest.mark.parametrize("url, needle", [
    (data_uri(b"this is not an image"), "not a readable image"),
    ("data:image/png;base64,%%%", "not valid base64"),
    ("http://images.invalid/cat.png", "remote image URLs are not fetched"),
    ("/no/such/picture.png", "cannot read image"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_image_is_a_400_and_the_server_keeps_serving(client, url, needle, stream):
    with pytest.raises(openai.BadRequestError) as caught:  # a status, also before a stream would start
        client.chat.completions.create(model="tiny-llava", messages=ask(url), stream=stream, **GREEDY)
    assert caught.value.status_code == 400
    assert needle in caught.value.message, caught.value.message
    assert caught.value.code == "invalid_image"
    after = client.chat.completions.create(model="tiny-llava", messages=ask(data_uri(SAMPLE.read_bytes())), **GREEDY)
    assert after.choices[0].message.content


def test_truncated_image_is_a_400(client):
    raw = SAMPLE.read_bytes()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-llava", messages=ask(data_uri(raw[: len(raw) // 2])), **GREEDY)
    assert "truncated" in caught.value.message


def test_listening_on_a_busy_port_is_one_line(server, llava_fixture, llava_mmproj):
    from conftest import assert_one_line_error, run_cli

    port = server.rsplit(":", 1)[1].split("/")[0]
    result = run_cli("serve", llava_fixture / "text.gguf", llava_mmproj, "--port", port, timeout=120)
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


def test_local_files_are_refused_when_not_allowed():
    import json

    from ggraft.jobs.serve import image_problem, is_loopback

    body = json.dumps({"messages": ask(str(SAMPLE))}).encode()
    assert image_problem(body, allow_files=True) is None
    assert "local image files are not served" in image_problem(body, allow_files=False)
    assert image_problem(json.dumps({"messages": ask(data_uri(SAMPLE.read_bytes()))}).encode(), allow_files=False) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
