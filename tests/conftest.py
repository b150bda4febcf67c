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


def config_variant(src: Path, dst: Path, vision: dict | None = None, preprocessor: dict | None = None,
                   extra: dict | None = None, **top) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with ``vision_config`` entries, preprocessor_config.json
    entries and top-level config entries changed (``None`` removes one), and ``extra`` tensors
    ({name: array}) saved beside the weights."""
    import json
    import shutil

    shutil.copytree(src, dst)
    for file, section, changes in (("config.json", "vision_config", vision), ("config.json", None, top),
                                   ("preprocessor_config.json", None, preprocessor)):
        if not changes:
            continue
        data = json.loads((dst / file).read_text())
        target = data.setdefault(section, {}) if section else data
        for k, v in changes.items():
            if v is None:
                target.pop(k, None)
            else:
                target[k] = v
        (dst / file).write_text(json.dumps(data))
    if extra:
        from safetensors.numpy import save_file

        save_file(extra, dst / "extra.safetensors")
    return dst


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
