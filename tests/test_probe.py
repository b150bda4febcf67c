"""ggraft probe: the attention-share invariants on every family's tiny fixture, and the CLI contract."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys

import pytest
import torch

from fixtures import llava
from ggraft.errors import InputError
from ggraft.hf.checkpoint import Checkpoint
from ggraft.jobs import probe as probe_job
from tests.conftest import ROOT, run_cli

IMAGE = ROOT / "fixtures" / "sample.png"


@pytest.fixture(scope="module")
def hf_dir():
    return llava.build() / "hf"


@pytest.fixture()
def model(hf_dir):
    return probe_job.load_model(Checkpoint(hf_dir))


def positions(hf_dir, model):
    """(is_image mask, first text position) of the inputs probe builds, found independently."""
    ids = probe_job.build_inputs(Checkpoint(hf_dir), IMAGE, probe_job.DEFAULT_PROMPT, model)["input_ids"][0]
    is_image = ids == json.loads((hf_dir / "config.json").read_text())["image_token_index"]
    return is_image, int(is_image.nonzero().max()) + 1


def test_shares_are_fractions(hf_dir, model):
    report = probe_job.probe(hf_dir, IMAGE, model=model)
    layers = model.config.text_config.num_hidden_layers
    assert len(report.text_to_image) == len(report.image_change) == len(report.text_change) == layers
    assert all(0.0 <= s <= 1.0 for s in report.text_to_image)
    assert all(0.0 <= c <= 2.0 for c in report.image_change + report.text_change)
    assert report.image_tokens == 16  # (56 / 14)^2 patches, CLS dropped ("default" strategy)


def test_uniform_attention_gives_the_image_share_of_the_context(hf_dir, model):
    with torch.no_grad():  # q = 0: every score is 0, softmax is uniform over the causal context
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.zero_()
            if layer.self_attn.q_proj.bias is not None:
                layer.self_attn.q_proj.bias.zero_()
    is_image, first_text = positions(hf_dir, model)
    n_image, n = int(is_image.sum()), len(is_image)
    expected = sum(n_image / (q + 1) for q in range(first_text, n)) / (n - first_text)
    report = probe_job.probe(hf_dir, IMAGE, model=model)
    assert report.uniform_share == pytest.approx(expected, abs=1e-12)
    for share, normalized in zip(report.text_to_image, report.normalized):
        assert share == pytest.approx(expected, abs=1e-6)
        assert normalized == pytest.approx(1.0, abs=1e-5)


def test_text_attending_only_to_image_gives_one(hf_dir, model, monkeypatch):
    from transformers.models.llama import modeling_llama

    is_image, first_text = positions(hf_dir, model)
    original = modeling_llama.eager_attention_forward

    def image_only(module, query, key, value, attention_mask, scaling, **kwargs):
        q, k = query.shape[-2], key.shape[-2]
        bias = torch.zeros(q, k, dtype=query.dtype)
        if attention_mask is None:
            bias = bias.masked_fill(torch.ones(q, k, dtype=torch.bool).triu(1), -1e9)
        bias[first_text:, ~is_image] = -1e9
        mask = bias if attention_mask is None else attention_mask + bias
        return original(module, query, key, value, mask, scaling, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", image_only)
    report = probe_job.probe(hf_dir, IMAGE, model=model)
    assert report.text_to_image == pytest.approx([1.0] * len(report.text_to_image), abs=1e-6)
    assert report.saturation_layer is None


def test_saturation_layer():
    assert probe_job.saturation_layer([0.68, 0.3, 0.07, 0.04, 0.05], 0.25) == 2
    assert probe_job.saturation_layer([0.68, 0.07, 0.3, 0.04], 0.25) == 3
    assert probe_job.saturation_layer([0.5, 0.5], 0.25) is None


def test_cli_json(hf_dir):
    r = run_cli("probe", hf_dir, "--image", IMAGE, "-p", "what colour is the sky", "--json")
    assert r.code == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["text_to_image"]) == 2 and data["image_tokens"] == 16
    assert data["fraction"] == 0.25


def test_cli_bad_checkpoint(tmp_path):
    r = run_cli("probe", tmp_path, "--image", IMAGE)
    assert r.code == 2 and r.stdout == ""
    assert r.stderr.startswith("Error:") and len(r.stderr.strip().splitlines()) == 1


def test_cli_no_image_token(hf_dir, tmp_path):
    no_token = tmp_path / "hf"
    shutil.copytree(hf_dir, no_token)
    config = json.loads((no_token / "config.json").read_text())
    del config["image_token_index"]
    (no_token / "config.json").write_text(json.dumps(config))
    r = run_cli("probe", no_token, "--image", IMAGE)
    assert r.code == 2 and "image token" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_plot_without_matplotlib(hf_dir, tmp_path):
    """Without matplotlib (the ``plot`` extra), --plot is refused before the model runs."""
    code = ("import sys; sys.modules['matplotlib'] = None; sys.argv = ['ggraft'] + sys.argv[1:]; "
            "from ggraft.cli.main import main; main()")
    r = subprocess.run([sys.executable, "-c", code, "probe", str(hf_dir), "--image", str(IMAGE), "--plot",
                        str(tmp_path / "curve.png")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "pip install" in r.stderr and "matplotlib" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "curve.png").exists()


def test_cli_plot_and_compare(hf_dir, tmp_path):
    """--plot draws both checkpoints of --compare into one PNG; --json lists both reports."""
    pytest.importorskip("matplotlib")
    other = family_copy(tmp_path, "other", hf_dir, None, "<image>")
    png = tmp_path / "curve.png"
    r = run_cli("probe", hf_dir, "--image", IMAGE, "--compare", other, "--plot", png, "--json")
    assert r.code == 0, r.stderr
    data = json.loads(r.stdout)
    assert [d["checkpoint"] for d in data] == [str(hf_dir), str(other)]
    assert data[0]["context"] != data[1]["context"]  # the second renders its own chat template
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# -- every family ggraft converts whose transformers class returns attention weights ------------

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}"
          "{% if p['type'] == 'image' %}IMAGE{% else %}{{ p['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
HY_IMAGE = "<｜hy_place▁holder▁no▁100｜><｜hy_place▁holder▁no▁102｜><｜hy_place▁holder▁no▁101｜>"
#: fixture, the tokens its vocabulary adds when its folder has no tokenizer (an attribute of the fixture
#: module, or (module, attribute)), what its hub chat template writes for an image, the image features
#: of the family's test image, and the layout probed when not hf/
FAMILIES = {
    "llava": ("llava", "build", None, "<image>", 16),
    "llava_siglip": ("llava_siglip", "build", None, "<image>", 100),
    "qwen2.5omni": ("qwen25omni", "build", None, "<|vision_bos|><|IMAGE|><|vision_eos|>", 48),
    "muse_glimmer": ("muse_glimmer", "build", None, "<|image_start|><|patch|><|image_end|>", 15),
    "nemotron_omni": ("nemotron_omni", "build", None, "<img><image></img>", 25),
    "dots3note": ("dots3note", "build", None, "<|img|><|imgpad|><|endofimg|>", 35),
    "gemma3": ("gemma3", "build", None, "<start_of_image>", 16),
    "idefics3": ("idefics3", "build", None, "<image>", 16),
    "internvl": ("internvl", "build", None, "<IMG_CONTEXT>", 16),
    "lfm2vl": ("lfm2vl", "build", "TOKENS", "<image>", 64),
    "mistral3": ("mistral3", "build", None, "[IMG]", 12),
    "qwen2vl": ("qwen2vl", "build_qwen2", "TOKENS", QWEN_IMAGE, 12),
    "qwen2.5vl": ("qwen2vl", "build_qwen25", "TOKENS", QWEN_IMAGE, 48),
    "qwen3vl": ("qwen3vl", "build_qwen3vl", "TOKENS", QWEN_IMAGE, 12),
    "qwen3.5": ("qwen3vl", "build_qwen35", "TOKENS", QWEN_IMAGE, 12),
    "gemma4": ("gemma4", "build", None, "<|image|>", 72),
    # Qwen3-Omni: a thinker-only save (the full model keeps the image token in thinker_config); Qwen3-VL's vocabulary
    "qwen3omni": ("qwen_extras", "build_qwen3omni", ("qwen3vl", "TOKENS"), QWEN_IMAGE, 12, "hf-thinker"),
    # the whole model (thinker and talker; probe reads the thinker, its image token in thinker_config)
    "qwen3omni-whole": ("qwen_extras", "build_qwen3omni", ("qwen3vl", "TOKENS"), QWEN_IMAGE, 12),
    # anyres: the processor's base image, tiles (unpadded) and newline rows
    "llava_next": ("llava_next", "build", None, "<image>", 78),
    "llava_onevision": ("llava_next", "build_onevision", None, "<image>", 105),
    "llava_next_granite": ("llava_next", "build_granite", None, "<image>", 112),
    "granite4_vision": ("granite4_vision", "build", None, "<image>", 78),
    # transformers 5.24's wrapper fails after its text model ran (modeling_llama4.py:1318): probe reads the text model's output
    "llama4": ("llama4", "build", None, "<|image|>", 16),
    "paddleocr": ("paddleocr", "build", None, "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>", 16),
    "minicpmv4_6": ("minicpmv", "build", None, "<image></image>", 16),  # the processor fills <unk> between
    "glm4v": ("glm4v", "build", None, "<|image|>", 12),
    "glm-ocr": ("glm4v", "build_ocr", None, "<|image|>", 12),
    "lightonocr": ("lightonocr", "build", None, "<|image_pad|>", 12),
    "janus_pro": ("janus", "build", None, "<image_placeholder>", 64),
    "kimik25": ("kimik25", "build", None, "<|media_pad|>", 35),
    "minimax_m3": ("minimax_m3", "build", None, "]<]image[>[", 12),
    "glm5v": ("glm5v", "build", None, "<|begin_of_image|><|image|><|end_of_image|>", 12),
    "exaone4_5": ("exaone4_5", "build", None, "<vision><|image_pad|></vision>", 99),
    "hunyuanvl": ("hunyuanvl", "build", "TOKENS", HY_IMAGE, 17),
    "step3vl": ("step3vl", "build", None, "<im_patch>", 49),
    "deepseekocr2": ("deepseekocr", "build_ocr2", "SPECIAL", "<image>", 257),
    "unlimited_ocr": ("deepseekocr", "build_unlimited", "SPECIAL", "<image>", 273),
}


def family_copy(tmp_path, name, hf, tokens, image):
    """``hf`` as the hub ships it: its tokenizer, and a chat template writing ``image`` for an image."""
    from fixtures.tokenizer import train

    dest = tmp_path / name
    shutil.copytree(hf, dest)
    if tokens is not None:
        train(special=tokens).save_hf(dest)  # the fixture's own vocabulary (deterministic training)
    (dest / "chat_template.jinja").write_text(CHATML.replace("IMAGE", image))
    return dest


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    module, builder, tokens, image, n_features, *layout = FAMILIES[request.param]
    fixture = importlib.import_module(f"fixtures.{module}")
    hf = getattr(fixture, builder)() / (layout[0] if layout else "hf")
    vocab = getattr(importlib.import_module(f"fixtures.{tokens[0]}"), tokens[1]) if isinstance(tokens, tuple) \
        else getattr(fixture, tokens) if tokens else None
    folder = family_copy(tmp_path_factory.mktemp("probe"), request.param, hf, vocab, image)
    return folder, n_features


def test_family_shares_are_fractions_with_one_row_per_layer(family):
    folder, n_features = family
    model = probe_job.load_model(Checkpoint(folder))
    report = probe_job.probe(folder, IMAGE, model=model)
    ids = probe_job.build_inputs(Checkpoint(folder), IMAGE, probe_job.DEFAULT_PROMPT, model)["input_ids"][0]
    assert report.image_tokens == n_features == int((ids == probe_job.image_token_id(Checkpoint(folder).config)).sum())
    text = model.config.get_text_config()
    assert len(report.text_to_image) == len(report.image_change) == text.num_hidden_layers
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    for kind, share in zip(kinds, report.text_to_image):
        assert (share is None) == ("attention" not in kind or "linear" in kind), (kind, share)
        assert share is None or 0.0 <= share <= 1.0


def test_family_uniform_attention_gives_the_image_share(family):
    """Every query projection zeroed (the vision tower's too, which changes only what the image
    tokens hold): each score is 0 (q-norms of 0 are 0), the softmax is uniform."""
    folder, _ = family
    model = probe_job.load_model(Checkpoint(folder))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "q_b_proj")):  # MLA's query (GLM-5 Next) goes through q_b_proj
                for tensor in module.parameters():  # Gemma 4's vision q_proj wraps its Linear
                    tensor.zero_()
    report = probe_job.probe(folder, IMAGE, model=model)
    for share, normalized in zip(report.text_to_image, report.normalized):
        if share is not None:
            assert share == pytest.approx(report.uniform_share, abs=1e-6)
            assert normalized == pytest.approx(1.0, abs=1e-5)


def test_forward_failing_after_its_text_model_gives_the_text_models_output(hf_dir, model, monkeypatch):
    """A wrapper that raises AttributeError after its text model ran (Llama 4 in transformers 5.24,
    modeling_llama4.py:1318) is probed from its text model's output; a failure before it is one line."""
    expected = probe_job.probe(hf_dir, IMAGE, model=model)
    forward = type(model).forward

    def broken_after(self, *args, **kwargs):
        forward(self, *args, **kwargs)
        raise AttributeError("'CausalLMOutputWithPast' object has no attribute 'image_outputs'")

    monkeypatch.setattr(type(model), "forward", broken_after)
    assert probe_job.probe(hf_dir, IMAGE, model=model).text_to_image == pytest.approx(expected.text_to_image)

    def broken_before(self, *args, **kwargs):
        raise AttributeError("no vision tower")

    monkeypatch.setattr(type(model), "forward", broken_before)
    with pytest.raises(InputError, match="forward failed"):
        probe_job.probe(hf_dir, IMAGE, model=model)


def test_template_without_image_slot_is_refused(hf_dir, tmp_path):
    folder = family_copy(tmp_path, "no-slot", hf_dir, None, "")
    r = run_cli("probe", folder, "--image", IMAGE)
    assert r.code == 2 and "puts no image token" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_fraction(hf_dir):
    with pytest.raises(InputError):
        probe_job.probe(hf_dir, IMAGE, fraction=1.5)


def test_anyres_checkpoint_without_its_image_processor_is_one_line(tmp_path):
    """LLaVA-NeXT lays its tiles out with the checkpoint's own image processor: without one, one line."""
    from fixtures import llava_next

    folder = family_copy(tmp_path, "next", llava_next.build() / "hf", None, "<image>")
    (folder / "preprocessor_config.json").unlink()
    r = run_cli("probe", folder, "--image", IMAGE)
    assert r.code == 2 and r.stdout == "" and "image processor" in r.stderr and "bug" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")] and "Traceback" not in r.stderr
