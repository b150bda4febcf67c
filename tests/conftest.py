"""Shared test fixtures: the tiny models (built once into .cache/fixtures) and a CLI runner.

Family fixtures live in ``fixtures/<family>.py`` (each with ``build() -> Path``); tests get
them through the session fixtures below or by calling ``build()`` directly.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from ggraft.gguf_io.output_types import OUTPUT_TYPES

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fixtures package sits at the repo root


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: int = 600) -> CliResult:
    """Run the installed ``ggraft`` command in a subprocess (as a user would)."""
    exe = Path(sys.executable).with_name("ggraft")
    p = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr)


def pair_warnings(text: Path, mmproj: Path) -> list[str]:
    """The warnings ``ggraft check`` gives for a pair (e.g. a known llama.cpp runtime defect for
    the installed llama-cpp-python), which ``run``/``pack`` pass on to the user."""
    from ggraft.pair.check import check_pair

    return [f.message for f in check_pair(text, mmproj).findings if f.severity == "warning"]


def without_warnings(result: CliResult, warnings: list[str]) -> CliResult:
    """``result`` with exactly these ``Warning: ...`` lines removed from stderr."""
    lines = result.stderr.splitlines(keepends=True)
    for w in warnings:
        lines.remove(f"Warning: {w}\n")
    return CliResult(result.code, result.stdout, "".join(lines))


def assert_one_line_error(result: CliResult, *needles: str) -> None:
    """Exit 2, a single 'Error:' line (plus an optional 'Hint:'), no traceback, naming ``needles``."""
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and lines[0].startswith("Error: "), result.stderr
    assert all(ln.startswith(("Error: ", "Hint: ")) for ln in lines), result.stderr
    assert len([ln for ln in lines if ln.startswith("Error: ")]) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@pytest.fixture(scope="session")
def cli():
    return run_cli


@pytest.fixture(scope="session")
def llava_fixture() -> Path:
    """Folder with hf/ (transformers 5 layout), hf-hub/ (4.x layout, sharded) and text.gguf."""
    from fixtures import llava

    return llava.build()


@pytest.fixture(scope="session")
def llava_mmproj(llava_fixture, tmp_path_factory) -> Path:
    """An f32 mmproj converted from the tiny LLaVA with the library API."""
    from ggraft.mmproj import writer as mmproj
    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.mmproj.converter import converter_for

    out = tmp_path_factory.mktemp("llava") / "mmproj-f32.gguf"
    return mmproj.convert(converter_for(Checkpoint(llava_fixture / "hf")), out, "f32")


#: the per-token cosine bar of each output type (its one home: ggraft.gguf_io.output_types)
BARS = {t.name: t.bar for t in OUTPUT_TYPES}
FIDELITY_RESULTS = ROOT / ".cache" / "fidelity"


def record_fidelity(family: str, outtype: str, report) -> None:
    """Keep a fidelity test's measured figures (``VerifyReport``) for the README's families table
    (``make families-table``): one JSON file per family and output type under .cache/fidelity."""
    import json

    FIDELITY_RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"family": family, "outtype": outtype, "passed": report.passed,
            "min_cosine": report.result.min_cosine if report.result else None,
            "runtime_note": report.runtime_note,
            "runtime_min_cosine": report.runtime_result.min_cosine if report.runtime_result else None}
    (FIDELITY_RESULTS / f"{family}-{outtype}.json").write_text(json.dumps(data, indent=1))


_WORST: dict[tuple[str, str], float] = {}  # (family, outtype) -> the lowest cosine recorded


def assert_fidelity(family: str, outtype: str, report, *, tokens: int | None = None,
                    image_size: tuple[int, int] | None = None, defect: str | None = None,
                    context: object = None) -> None:
    """What every family's fidelity test asserts of a ``VerifyReport``: a result, ``outtype``'s bar,
    the expected token count and image size; the worst report per (family, outtype) is recorded
    for the README's table. Then the file passes strictly or, where ``defect`` (a llama.cpp
    file:line) is given, that runtime defect is named and transformers run the runtime's way
    clears the bar."""
    assert report.result is not None, (context, report.problem)
    assert report.bar == BARS[outtype] and report.outtype == outtype, (context, report)
    if tokens is not None:
        assert report.result.tokens == tokens, (context, report.result)
    if image_size is not None:
        assert report.image_size == image_size, (context, report.image_size)
    if report.result.min_cosine < _WORST.get((family, outtype), float("inf")):
        _WORST[family, outtype] = report.result.min_cosine
        record_fidelity(family, outtype, report)
    if defect is None or report.passed:
        assert report.passed, (context, report.result)
    else:
        assert report.runtime_note and defect in report.runtime_note, (context, report)
        assert report.runtime_result.min_cosine >= BARS[outtype], (context, report.runtime_result)


def family_fixtures(build: Callable[[], Path], name: str):
    """The module fixtures of a one-fixture family test: ``folder`` (``build()``, once per module)
    and ``converted(layout, outtype)`` (its mmproj, converted once per key). Use as
    ``folder, converted = family_fixtures(lambda: exaone4_5.build(), "exaone4_5")``."""

    @pytest.fixture(scope="module", name="folder")
    def folder_fixture() -> Path:
        return build()

    @pytest.fixture(scope="module", name="converted")
    def converted_fixture(folder, tmp_path_factory):
        get = conversion_cache({name: folder}, tmp_path_factory.mktemp(name))
        return lambda layout, outtype: get(name, layout, outtype)

    return folder_fixture, converted_fixture


def families_fixtures(builds: dict[str, Callable[[], Path]], name: str):
    """The same for a test module of several fixtures: ``fixture_dirs`` ({family: folder}) and
    ``converted(family, layout, outtype)``."""

    @pytest.fixture(scope="module", name="fixture_dirs")
    def dirs_fixture() -> dict[str, Path]:
        return {family: build() for family, build in builds.items()}

    @pytest.fixture(scope="module", name="converted")
    def converted_fixture(fixture_dirs, tmp_path_factory):
        return conversion_cache(fixture_dirs, tmp_path_factory.mktemp(name))

    return dirs_fixture, converted_fixture


def assert_same_tensors(a: Path, b: Path, ordered: bool = False) -> None:
    """Two GGUF files hold the same tensors, byte for byte (in the same order when ``ordered``)."""
    import numpy as np

    ta, tb = gguf_tensors(a), gguf_tensors(b)
    assert (list(ta) == list(tb)) if ordered else (sorted(ta) == sorted(tb)), (a, b)
    for n in ta:
        assert ta[n].tensor_type == tb[n].tensor_type, n
        assert np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)), n


def _change(data: dict, changes: dict | None) -> None:
    """Set ``changes`` in ``data``: a dotted key names an entry of a nested dict (``a.b``: data["a"]["b"]),
    a plain key replaces the whole entry, ``None`` removes one."""
    for key, value in (changes or {}).items():
        *path, name = key.split(".")
        target = data
        for part in path:
            target = target.setdefault(part, {})
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value


def changed_config(src: Path, vision: dict | None = None, vision_section: str = "vision_config", **top) -> dict:
    """Checkpoint ``src``'s config.json with ``vision`` entries of ``vision_section`` (a dotted path, e.g.
    ``thinker_config.vision_config``) and top-level entries changed, as ``_change`` does."""
    import json

    data = json.loads((Path(src) / "config.json").read_text())
    _change(data, {f"{vision_section}.{k}": v for k, v in (vision or {}).items()})
    _change(data, top)
    return data


def config_variant(src: Path, dst: Path, vision: dict | None = None, preprocessor: dict | None = None,
                   extra: dict | None = None, *, vision_section: str = "vision_config",
                   extra_file: str = "extra.safetensors", **top) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with config.json changed as ``changed_config`` says,
    preprocessor_config.json entries changed the same way, and ``extra`` tensors ({name: array}) saved
    in ``extra_file`` (beside the weights, or added to an existing file such as model.safetensors)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    if vision or top:
        (dst / "config.json").write_text(json.dumps(changed_config(dst, vision, vision_section, **top)))
    if preprocessor:
        data = json.loads((dst / "preprocessor_config.json").read_text())
        _change(data, preprocessor)
        (dst / "preprocessor_config.json").write_text(json.dumps(data))
    if extra:
        from safetensors.numpy import load_file, save_file

        weights = dst / extra_file
        save_file({**(load_file(weights) if weights.exists() else {}), **extra}, weights, metadata={"format": "pt"})
    return dst


def assert_refused(src: Path, out_dir: Path, *needles: str) -> None:
    """``ggraft convert src`` is refused (``assert_one_line_error`` naming ``needles``) and leaves no
    output file, nor the writer's temporary one, in ``out_dir``."""
    out = out_dir / "m.gguf"
    assert_one_line_error(run_cli("convert", src, "-o", out), *needles)
    assert not out.exists() and not list(out_dir.glob(".m.gguf*"))


def assert_audit_finds(folder: Path, family: str, expected: int, *donors: str,
                       sources: tuple[str, ...] = ("text.gguf", "hf"), library: bool = False) -> dict:
    """``ggraft audit --json`` (``library``: ``ggraft.jobs.audit.audit``) of each of ``sources`` in
    ``folder`` finds all ``expected`` of ``family``'s tokens, and a donor label holding each of ``donors``
    (labels read 'Family (Architecture, ...)': 'Family (' names one by its family).  Returns the last
    audit's data."""
    import json

    from ggraft.jobs.audit import audit

    for source in sources:
        data = audit(folder / source).to_dict() if library else json.loads(
            run_cli("audit", folder / source, "--json").stdout)
        assert {"family": family, "found": expected, "expected": expected} in data["families"], (source, data)
        for donor in donors:
            assert any(donor in d for d in data["donors"][family]), (source, donor, data["donors"])
    return data


def cli_convert(ckpt: Path, out: Path, outtype: str, projector: str | None = None) -> Path:
    """``ggraft convert ckpt -o out --outtype outtype --json`` succeeds (and names ``projector``)."""
    import json

    res = run_cli("convert", ckpt, "-o", out, "--outtype", outtype, "--json")
    assert res.code == 0, res.stderr
    if projector is not None:
        assert json.loads(res.stdout)["projector_type"] == projector, res.stdout
    return out


def assert_cli_verified(res: CliResult, outtype: str, *, projector: str | None = None, defect: str | None = None,
                        tokens: int | None = None, image_size: tuple[int, int] | None = None) -> dict:
    """What a ``ggraft verify --json`` run is asserted to say (its JSON is returned): exit 0 and a pass
    clearing ``outtype``'s bar; where ``defect`` (a llama.cpp file:line) is given, a pass (exit 0) or exit 1
    with that runtime defect named and transformers run the runtime's way clearing the bar; the projector
    type, token count and image size where given."""
    import json

    data = json.loads(res.stdout)
    context = (res.stdout, res.stderr)
    if defect is None:
        assert res.code == 0 and data["passed"] and data["result"]["min_cosine"] >= BARS[outtype], context
    else:
        assert res.code == (0 if data["passed"] else 1), context
        assert data["passed"] or (defect in data["runtime_note"]
                                  and data["runtime_result"]["min_cosine"] >= BARS[outtype]), context
    if projector is not None:
        assert data["projector_type"] == projector, context
    if tokens is not None:
        assert data["result"]["tokens"] == tokens, context
    if image_size is not None:
        assert data["image_size"] == list(image_size), context
    return data


def cli_convert_and_verify(ckpt: Path, tmp_path: Path, outtype: str = "bf16", *, text: Path | None = None,
                           verify_args: tuple = (), before_verify: Callable[[Path], None] | None = None,
                           projector: str | None = None, **expected) -> dict:
    """The CLI round trip: ``cli_convert`` of ``ckpt``, then ``ggraft verify ckpt out [--text text]
    *verify_args --json`` asserted by ``assert_cli_verified`` (``expected``: defect, tokens, image_size).
    ``before_verify(out)`` runs between the two (e.g. an xfail for a file llama.cpp would abort on)."""
    out = cli_convert(ckpt, tmp_path / "mmproj.gguf", outtype, projector)
    if before_verify is not None:
        before_verify(out)
    res = run_cli("verify", ckpt, out, *(("--text", text) if text else ()), *verify_args, "--json")
    return assert_cli_verified(res, outtype, projector=projector, **expected)


def token_piece(vocab, token: int) -> str:
    """The text of one token (special tokens rendered) of a ``llama_vocab *``."""
    import ctypes

    import llama_cpp

    piece = ctypes.create_string_buffer(64)
    used = llama_cpp.llama_token_to_piece(vocab, token, piece, 64, 0, True)
    return piece.raw[:used].decode()


def llama_chunks(mmproj: Path, text: Path | None, rgb, n_embd: int, *, pieces: bool = False,
                 n_threads: int | None = None) -> list[tuple[str, object]]:
    """Every chunk llama.cpp makes of one image, in prompt order (``VisionEncoder.encode_chunks``, with
    ``text``'s vocabulary loaded): ("image", embeddings) and ("text", token ids, or with ``pieces``
    their texts)."""
    import llama_cpp

    from ggraft.pair import engine

    model = engine.load_text_model(text) if text else None
    try:
        with engine.VisionEncoder(mmproj, model, n_threads=n_threads) as enc:
            chunks = enc.encode_chunks(rgb, n_embd)
        if pieces:
            vocab = llama_cpp.llama_model_get_vocab(model)
            chunks = [(kind, [token_piece(vocab, t) for t in c] if kind == "text" else c) for kind, c in chunks]
        return chunks
    finally:
        engine.free_text_model(model)


def window_attention_cosines(ckpt_dir: Path, attend_fully: Callable[[object], None],
                             sizes: list[tuple[int, int]] | None = None) -> list:
    """Per-token cosines, for a test image of each of ``sizes`` (default: the family's own), between
    transformers' features of the checkpoint as it is and after ``attend_fully(model)`` has every block
    attend fully: a test image exercises the window attention where they differ."""
    import torch

    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.jobs.verify import load_reference_model, pixel_values, test_image
    from ggraft.mmproj.converter import converter_for

    ckpt = Checkpoint(ckpt_dir)
    conv = converter_for(ckpt)
    model, p = load_reference_model(ckpt, conv.reference_class()), conv.params()
    pvs = [pixel_values(test_image(*size), p.image_mean, p.image_std) for size in sizes or [conv.test_image_size()]]
    with torch.no_grad():
        windowed = [conv.reference_features(model, pv).pooler_output[0] for pv in pvs]
        attend_fully(model)
        full = [conv.reference_features(model, pv).pooler_output[0] for pv in pvs]
    return [torch.nn.functional.cosine_similarity(w, f, dim=-1) for w, f in zip(windowed, full)]


def pair_codes(text: Path, mmproj: Path) -> dict:
    """``check_pair``'s findings of a pair that passes (``report.ok``), by code."""
    from ggraft.pair.check import check_pair

    report = check_pair(text, mmproj)
    assert report.ok, report.findings
    return {f.code: f for f in report.findings}


def cli_check(text: Path, mmproj: Path, width: int | None = None) -> tuple[dict, dict]:
    """``ggraft check --json`` of a pair that passes (exit 0, ok): its JSON and its findings by code;
    with ``width``, the projection and the text model's embedding are that wide."""
    import json

    res = run_cli("check", text, mmproj, "--json")
    data = json.loads(res.stdout)
    assert res.code == 0 and data["ok"], res.stdout
    if width is not None:
        assert data["mmproj"]["projection_width"] == data["text"]["embedding_length"] == width, data
    return data, {f["code"]: f for f in data["findings"]}


def conversion_cache(fixture_dirs: dict[str, Path], out_dir: Path):
    """``get(family, layout, outtype)``: the fixture ``fixture_dirs[family] / layout`` converted
    to an mmproj of ``outtype``, once per key."""
    from ggraft.mmproj import writer as mmproj
    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.mmproj.converter import converter_for

    done: dict[tuple[str, str, str], Path] = {}

    def get(family: str, layout: str, outtype: str) -> Path:
        key = (family, layout, outtype)
        if key not in done:
            conv = converter_for(Checkpoint(fixture_dirs[family] / layout))
            done[key] = mmproj.convert(conv, out_dir / f"{family}-{layout}-{outtype}.gguf", outtype)
        return done[key]

    return get


def gguf_tensors(path) -> dict:
    """{name: gguf.ReaderTensor} of a GGUF file."""
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}
