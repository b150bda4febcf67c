"""ggraft probe on the tiny LLaVA fixture: the attention-share invariants and the CLI contract."""
from __future__ import annotations

import importlib.util
import json
import shutil

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


def positions(hf_dir):
    """(is_image mask, first text position) of the inputs probe builds, found independently."""
    ids = probe_job.build_inputs(Checkpoint(hf_dir), IMAGE, probe_job.DEFAULT_PROMPT)["input_ids"][0]
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
    is_image, first_text = positions(hf_dir)
    n_image, n = int(is_image.sum()), len(is_image)
    expected = sum(n_image / (q + 1) for q in range(first_text, n)) / (n - first_text)
    report = probe_job.probe(hf_dir, IMAGE, model=model)
    assert report.uniform_share == pytest.approx(expected, abs=1e-12)
    for share, normalized in zip(report.text_to_image, report.normalized):
        assert share == pytest.approx(expected, abs=1e-6)
        assert normalized == pytest.approx(1.0, abs=1e-5)


def test_text_attending_only_to_image_gives_one(hf_dir, model, monkeypatch):
    from transformers.models.llama import modeling_llama

    is_image, first_text = positions(hf_dir)
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


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed")
def test_cli_plot_without_matplotlib(hf_dir, tmp_path):
    r = run_cli("probe", hf_dir, "--image", IMAGE, "--plot", tmp_path / "curve.png")
    assert r.code == 2 and "pip install matplotlib" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "curve.png").exists()


def test_bad_fraction(hf_dir):
    with pytest.raises(InputError):
        probe_job.probe(hf_dir, IMAGE, fraction=1.5)
