"""llama.cpp's AMX kernels crash on every quantized text model (ggml-org/llama.cpp#20824): every
text model ggraft loads goes through ``engine.text_model_params``, which turns llama.cpp's extra
buffer types off when the installed llama.cpp reports AMX.  The decision is tested with fake
system-info strings (this machine may have no AMX); the loads are tested on a quantized model
with the decision forced either way, so they run on every machine."""
from __future__ import annotations

import pytest

from conftest import ROOT, run_cli
from ggraft.errors import InputError
from ggraft.pair import engine

SAPPHIRE_RAPIDS = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
                   "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
                   "REPACK = 1 | ")
BUILT_WITHOUT_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
                     "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
ZEN = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | REPACK = 1 | "


@pytest.mark.parametrize("info, wanted", [(SAPPHIRE_RAPIDS, False), (BUILT_WITHOUT_AMX, True), (ZEN, True), ("", True),
                                          ("CPU : AMX_INT8 = 0 | REPACK = 1 |", True),
                                          ("Metal : EMBED_LIBRARY = 1 | CPU : AMX_INT8 = 1 | ", False)])
def test_extra_buffer_types_off_where_llama_cpp_reports_amx(info, wanted):
    assert engine.extra_bufts_wanted(info) is wanted


@pytest.mark.parametrize("env, wanted", [("1", True), ("0", False), ("on", True), ("OFF", False), (" true ", True),
                                         ("no", False), ("", False)])
def test_the_environment_variable_decides(env, wanted):
    """GGRAFT_EXTRA_BUFTS overrides the automatic choice (empty: automatic, here AMX: off)."""
    assert engine.extra_bufts_wanted(SAPPHIRE_RAPIDS, env=env) is wanted
    if env.strip():
        assert engine.extra_bufts_wanted(ZEN, env=env) is wanted


def test_the_option_wins_over_the_environment():
    assert engine.extra_bufts_wanted(SAPPHIRE_RAPIDS, option=True, env="0") is True
    assert engine.extra_bufts_wanted(ZEN, option=False, env="1") is False


def test_a_bad_environment_value_is_one_line():
    with pytest.raises(InputError, match="GGRAFT_EXTRA_BUFTS='maybe': expected 1 or 0"):
        engine.extra_bufts_wanted(ZEN, env="maybe")


@pytest.fixture
def amx(monkeypatch):
    """This process's llama.cpp reporting AMX, whatever the machine."""
    monkeypatch.delenv(engine.EXTRA_BUFTS_ENV, raising=False)
    monkeypatch.setattr(engine, "system_info", lambda: SAPPHIRE_RAPIDS)


def test_every_load_path_takes_the_decision(amx, monkeypatch):
    assert engine.text_model_params().use_extra_bufts is False
    assert engine.text_model_params(extra_bufts=True).use_extra_bufts is True
    monkeypatch.setenv(engine.EXTRA_BUFTS_ENV, "1")
    assert engine.text_model_params().use_extra_bufts is True
    monkeypatch.setattr(engine, "system_info", lambda: ZEN)
    monkeypatch.delenv(engine.EXTRA_BUFTS_ENV)
    assert engine.text_model_params().use_extra_bufts is True


@pytest.fixture(scope="module")
def quantized_text():
    """The tiny Mistral fine-tune the graft tests use: a Q8_0 text model."""
    from fixtures import mistral3

    return mistral3.build() / "recipient.gguf"


@pytest.mark.parametrize("forced", [None, True, False])
def test_a_quantized_model_loads_and_decodes_either_way(amx, quantized_text, forced):
    """``open_llama`` (Pair's and the tests' way to a ``llama_cpp.Llama``) loads with the decision
    (AMX reported: off unless forced) and the quantized model decodes."""
    llm = engine.open_llama(quantized_text, extra_bufts=forced, n_ctx=64, n_threads=2, verbose=False)
    try:
        assert llm.model_params.use_extra_bufts is (forced is True)
        llm.eval([1, 5, 9, 12])
        assert llm.n_tokens == 4
    finally:
        llm.close()
    model = engine.load_text_model(quantized_text, vocab_only=False, extra_bufts=forced)
    engine.free_text_model(model)


def test_pair_loads_its_text_model_through_the_decision(amx, quantized_text, tmp_path):
    """A grafted pair on the Q8_0 recipient (as tests/test_graft.py runs it) with AMX reported."""
    from fixtures import mistral3
    from ggraft.jobs.graft import graft
    from ggraft.pair.runtime import Pair

    mmproj = graft(mistral3.build() / "hf", quantized_text, tmp_path / "mmproj.gguf", outtype="f32").output
    with Pair(quantized_text, mmproj, n_ctx=512, n_threads=2) as pair:
        assert pair.llama.model_params.use_extra_bufts is False
    with Pair(quantized_text, mmproj, n_ctx=512, n_threads=2, extra_bufts=True) as pair:
        assert pair.llama.model_params.use_extra_bufts is True


def test_run_and_serve_help_say_it():
    for command in ("run", "serve"):
        result = run_cli(command, "--help")
        assert result.code == 0 and "--extra-bufts" in result.stdout and "AMX" in result.stdout
        assert "GGRAFT_EXTRA_BU" in result.stdout  # (a narrow terminal may cut the name)


def test_no_text_model_is_loaded_around_the_decision():
    """Every place that loads a text model goes through engine.open_llama / load_text_model."""
    sources = [p for p in (ROOT / "ggraft").rglob("*.py")] + list((ROOT / "tests").glob("*.py")) + \
        list((ROOT / "benchmarks").glob("*.py")) + list((ROOT / "fixtures").glob("*.py"))
    loads = ("llama_cpp.Llama(", "Llama(model_path", "llama_model_load_from_file")
    direct = [f"{p.relative_to(ROOT)}" for p in sources if p.name not in ("engine.py", "compat.py", "test_amx.py")
              and any(s in p.read_text() for s in loads)]
    assert direct == []
