"""The README's coverage table: one row per vision projector type of the installed llama.cpp
(docs/coverage.py), every registered converter counted as covered, and the generator runs
without touching the README."""
from __future__ import annotations

import pytest

from docs.coverage import AUDIO_PROJECTOR_TYPES, ROWS
from docs.families_table import README, families_block
from ggraft.mmproj.converter import discover
from ggraft.pair.boundary_tokens import BOUNDARY_TOKENS


def registered():
    return {c for cs in discover().values() for c in cs}


def lines_of(block: str, projector: str) -> list[list[str]]:
    """The cells of the table lines for ``projector``."""
    found = [line.strip("| ").split(" | ") for line in block.splitlines() if line.startswith(f"| `{projector}`")]
    assert found, projector
    return found


def test_every_vision_projector_type_has_exactly_one_row():
    types = [row.projector_type for row in ROWS]
    assert len(types) == len(set(types)), sorted(t for t in types if types.count(t) > 1)
    assert set(types) == set(BOUNDARY_TOKENS)  # mtmd.cpp's vision types, read from the same llama.cpp
    assert not set(types) & set(AUDIO_PROJECTOR_TYPES)


def test_rows_say_what_each_column_needs():
    taken: dict[str, set[str]] = {}
    for cls in registered():
        taken.setdefault(cls.projector_type, set()).update(cls.architectures)
    for row in ROWS:
        assert row.models and row.llama_cpp, row.projector_type
        assert row.transformers or row.transformers_note, f"{row.projector_type}: say why transformers has no class"
        left_out = set(row.architectures) - taken.get(row.projector_type, set())
        assert row.pending or (row.projector_type in taken and not left_out), \
            f"{row.projector_type}: say why ggraft does not convert it (or {sorted(left_out)}) yet"


def test_named_transformers_classes_exist_in_the_installed_transformers():
    transformers = pytest.importorskip("transformers")
    exported = set(dir(transformers))  # the lazy module's names: nothing imported
    missing = [(row.projector_type, c) for row in ROWS for c in row.transformers if c not in exported]
    assert not missing


def test_projector_types_are_known_to_the_installed_llama_cpp():
    from ggraft.pair.libmtmd import llama_cpp_knows

    if llama_cpp_knows("mlp") is None:
        pytest.skip("llama-cpp-python's libmtmd not found")
    unknown = [t for t in [r.projector_type for r in ROWS] + list(AUDIO_PROJECTOR_TYPES) if not llama_cpp_knows(t)]
    assert not unknown


def test_every_registered_converter_is_counted_as_covered():
    converters = registered()
    block = families_block(results={})
    types = {c.projector_type for c in converters}
    assert block.startswith(f"**{len(types)} of {len(ROWS)}** vision projector types")
    for cls in converters:
        ggraft_cells = [cells[4] for cells in lines_of(block, cls.projector_type)]
        assert any(cell.startswith(cls.family) for cell in ggraft_cells), (cls.family, ggraft_cells)
    for row in ROWS:
        if row.projector_type not in types:
            (cells,) = lines_of(block, row.projector_type)
            assert cells[4] == f"not yet: {row.pending}"


def test_generator_shows_recorded_figures_and_leaves_the_readme_alone():
    before = README.read_bytes()
    exact, emulated = sorted(registered(), key=lambda c: c.family)[:2]
    record = {"passed": True, "min_cosine": 0.9999876, "runtime_note": None, "runtime_min_cosine": None}
    below = {"passed": False, "min_cosine": 0.5, "runtime_note": "a named defect", "runtime_min_cosine": 0.9999912}
    block = families_block(results={exact.family: {"f16": record}, emulated.family: {"q8_0": below}})
    assert README.read_bytes() == before
    exact_line = next(c for c in lines_of(block, exact.projector_type) if c[4].startswith(exact.family))
    assert exact_line[5:] == ["–", "0.999988", "–", "–"]
    emulated_line = next(c for c in lines_of(block, emulated.projector_type) if c[4].startswith(emulated.family))
    assert emulated_line[-1] == "0.999991¹"
    assert "\n¹ llama.cpp's runtime departs" in block
    assert "¹ llama.cpp's runtime departs" not in families_block(results={})
