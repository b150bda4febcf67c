"""`ggraft run` and `ggraft.Pair` on the tiny LLaVA pair: deterministic output, --json timings,
images (several, WebP/JPEG, bad ones), templates (GGUF's, plain fallback, --raw), and pairs that
do not fit (exit 1 from the check; llama.cpp's own refusal in one line)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error, pair_warnings, run_cli, without_warnings

SAMPLE = ROOT / "fixtures" / "sample.png"


def rewrite_gguf(src: Path, out: Path, *, drop: tuple[str, ...] = (), values: dict[str, Any] | None = None,
                 tensors: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> Path:
    """A copy of a GGUF (gguf-py reader -> writer) with keys dropped or changed and tensors edited."""
    values, tensors = values or {}, tensors or {}
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in drop:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, values.get(field.name, field.contents()), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name in tensors:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            writer.add_tensor(t.name, np.ascontiguousarray(tensors[t.name](data)))
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def text(llava_fixture) -> Path:
    return llava_fixture / "text.gguf"


@pytest.fixture(scope="module")
def narrow_mmproj(llava_mmproj, tmp_path_factory) -> Path:
    """The tiny LLaVA's mmproj with its projector cut to 64 outputs: it no longer fits the 96-wide text model."""
    out = tmp_path_factory.mktemp("mismatch") / "mmproj-64.gguf"
    return rewrite_gguf(llava_mmproj, out, values={gguf.Keys.ClipVision.PROJECTION_DIM: 64},
                        tensors={"mm.2.weight": lambda w: w[:64], "mm.2.bias": lambda b: b[:64]})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    raw = SAMPLE.read_bytes()
    with Image.open(SAMPLE) as im:
        rgb = im.convert("RGB")
        for fmt in ("webp", "jpeg", "gif"):
            rgb.save(folder / f"sample.{fmt}")
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    (folder / "truncated.png").write_bytes(raw[: len(raw) // 2])
    return {p.name: p for p in folder.iterdir()}


def run(text, mmproj, *args) -> Any:
    return run_cli("run", text, mmproj, "--seed", "7", "--max-tokens", "12", *args, timeout=300)


def run_json(text, mmproj, *args) -> dict:
    result = run(text, mmproj, "--json", *args)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def test_same_seed_same_text(text, llava_mmproj):
    first = run(text, llava_mmproj, "--image", SAMPLE, "-p", "What is in the picture?")
    second = run(text, llava_mmproj, "--image", SAMPLE, "-p", "What is in the picture?")
    assert first.code == 0, first.stderr
    assert first.stdout.strip() and first.stdout == second.stdout
    assert first.stderr == "".join(f"Warning: {w}\n" for w in pair_warnings(text, llava_mmproj))


def test_json_has_the_reply_and_timings(text, llava_mmproj):
    data = run_json(text, llava_mmproj, "--image", SAMPLE, "-p", "What is in the picture?")
    assert data["text"] and data["finish_reason"] == "length" and data["template"] == "gguf"
    assert data["warnings"] == pair_warnings(text, llava_mmproj)
    t = data["timings"]
    assert t["images"] == 1 and t["generated_tokens"] == 12
    assert t["image_encode_ms"] > 0 and t["prompt_ms"] > 0 and t["load_ms"] > 0 and t["tokens_per_s"] > 0
    assert t["tokens_per_s"] == pytest.approx(t["generated_tokens"] / t["generation_ms"] * 1000, rel=0.01)


def test_several_images_and_formats(text, llava_mmproj, images):
    one = run_json(text, llava_mmproj, "--image", SAMPLE, "-p", "Describe.")
    three = run_json(text, llava_mmproj, "--image", SAMPLE, "--image", images["sample.webp"],
                     "--image", images["sample.jpeg"], "-p", "Compare the pictures.")
    assert three["timings"]["images"] == 3 and three["text"]
    per_image = three["timings"]["prompt_tokens"] - one["timings"]["prompt_tokens"]
    assert per_image >= 2 * 16  # 56x56 pixels in 14x14 patches: 16 tokens an image


@pytest.mark.parametrize("name, needle", [
    ("garbage.png", "not a readable image"),
    ("truncated.png", "truncated"),
    ("sample.gif", "GIF is not supported"),
    ("missing.png", "cannot read image"),
])
def test_bad_image_is_one_line_exit_2(text, llava_mmproj, images, name, needle):
    path = images.get(name, ROOT / name)
    assert_one_line_error(run(text, llava_mmproj, "--image", path, "-p", "x"), str(path), needle)


def test_mismatched_pair_stops_at_the_check(text, narrow_mmproj):
    result = run(text, narrow_mmproj, "--image", SAMPLE, "-p", "x")
    assert result.code == 1, (result.stdout, result.stderr)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "64" in errors[0] and "96" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_llama_cpp_refusal_is_reported_in_one_line(text, narrow_mmproj):
    from ggraft.errors import EngineError
    from ggraft.pair.runtime import Pair

    with pytest.raises(EngineError) as caught:
        Pair(text, narrow_mmproj, check=False)  # straight to llama.cpp, which refuses the pair
    assert "mismatch between text model (n_embd = 96) and mmproj (n_embd = 64)" in caught.value.message
    assert "\n" not in caught.value.message and "Failed to load mtmd context" not in caught.value.message
    assert caught.value.hint == "you may be using wrong mmproj"


def test_no_chat_template_falls_back_to_a_plain_prompt(text, llava_mmproj, tmp_path):
    bare = rewrite_gguf(text, tmp_path / "no-template.gguf", drop=(gguf.Keys.Tokenizer.CHAT_TEMPLATE,))
    result = run(bare, llava_mmproj, "--image", SAMPLE, "-p", "What is in the picture?")
    assert result.code == 0, result.stderr
    assert result.stderr.startswith("Warning: ") and "no chat template" in result.stderr
    assert run_json(bare, llava_mmproj, "--image", SAMPLE, "-p", "x")["template"] == "plain"


def test_raw_prompt_places_the_images_at_the_markers(text, llava_mmproj):
    data = run_json(text, llava_mmproj, "--raw", "--image", SAMPLE, "--image", SAMPLE,
                    "-p", "First <__media__> then <__media__> so")
    assert data["template"] == "raw" and data["timings"]["images"] == 2
    assert_one_line_error(run(text, llava_mmproj, "--raw", "--image", SAMPLE, "-p", "<__media__><__media__>"),
                          "2 <__media__> marker(s) but 1 image(s)")
    assert_one_line_error(run(text, llava_mmproj, "--raw", "--system", "Be brief.", "--image", SAMPLE, "-p", "x"),
                          "--system")


def test_python_api(text, llava_mmproj):
    from ggraft import Pair
    from ggraft.pair.messages import user_messages

    with Pair(text, llava_mmproj) as pair:
        whole = pair.describe(SAMPLE, "What is in the picture?", max_tokens=8, seed=3)
        assert isinstance(whole, str) and whole
        assert pair.describe(SAMPLE, "What is in the picture?", max_tokens=8, seed=3) == whole  # nothing left over
        pieces = list(pair.describe(SAMPLE, "What is in the picture?", max_tokens=8, seed=3, stream=True))
        assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
        reply = pair.generate(user_messages([SAMPLE], "And now?", system="Be brief."), max_tokens=5, seed=3)
        assert reply.read() and reply.finish_reason == "length"
        assert reply.timings.generated_tokens == 5 and reply.timings.images == 1


def test_prompt_longer_than_the_context_is_one_line(text, llava_mmproj):
    result = run(text, llava_mmproj, "--ctx", "256", "--image", SAMPLE, "-p", "word " * 400)
    assert_one_line_error(without_warnings(result, pair_warnings(text, llava_mmproj)), "does not fit the context", "--ctx")
