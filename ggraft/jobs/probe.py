"""``ggraft probe``: where a VLM's language model stops looking at the image (the DPVR curve).

One forward pass in transformers (eager attention, ``output_attentions`` and ``output_hidden_states``)
on one image and prompt gives, per language-model layer, the share of text queries' attention that
lands on image keys, that share over the image tokens' share of the causal context (1.0 = uniform),
and how much image and text tokens' hidden states still change (1 - cosine to the previous layer).
transformers and torch are needed here only (``ggraft[verify]``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ggraft.errors import InputError
from ggraft.hf.checkpoint import Checkpoint

#: families whose inputs probe builds itself when the checkpoint has no usable processor
FAMILIES = ("LlavaForConditionalGeneration",)
#: default --fraction: DPVR's LLaVA-1.5 share falls from 0.68 to 0.07 by layer 4 (about 0.1 of the
#: first layer) and to 0.04 after; a quarter marks the end of that fall, not noise in the tail
DEFAULT_FRACTION = 0.25
DEFAULT_PROMPT = "Describe the image."
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ProbeReport:
    checkpoint: str
    architecture: str
    image_tokens: int
    text_queries: int
    context: int
    fraction: float
    #: per language-model layer
    text_to_image: list[float] = field(default_factory=list)
    normalized: list[float] = field(default_factory=list)
    image_change: list[float] = field(default_factory=list)
    text_change: list[float] = field(default_factory=list)
    #: image tokens' share of the causal context, averaged over text queries (the uniform share)
    uniform_share: float = 0.0
    saturation_layer: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model(ckpt: Checkpoint):
    try:
        import torch
        import transformers
    except ImportError:
        raise InputError("ggraft probe needs torch and transformers", hint="pip install 'ggraft[verify]'") from None
    cls = getattr(transformers, ckpt.architecture or "", None) or transformers.AutoModelForImageTextToText
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        return cls.from_pretrained(ckpt.path, dtype=torch.float32, attn_implementation="eager").eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{ckpt.path}: transformers cannot load this checkpoint ({first})") from None


def image_token_id(config: dict[str, Any]) -> int:
    for key in ("image_token_id", "image_token_index"):
        if isinstance(config.get(key), int):
            return config[key]
    raise InputError("the checkpoint's config names no image token (image_token_id / image_token_index): "
                     "its inputs would hold no image to measure attention on")


def _text_ids(folder: Path, text: str) -> list[int]:
    """``text`` tokenized by the checkpoint's sentencepiece model, else by transformers' tokenizer."""
    spm = folder / "tokenizer.model"
    if spm.is_file():
        import sentencepiece

        return list(sentencepiece.SentencePieceProcessor(model_file=str(spm)).encode(text))
    try:
        from transformers import AutoTokenizer

        return list(AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False))
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: no tokenizer transformers can read ({str(e).splitlines()[0][:200]})") from None


def _pixels(image: Path, folder: Path, side: int):
    import json

    import numpy as np
    import torch
    from PIL import Image

    pre = folder / "preprocessor_config.json"
    pre_cfg = json.loads(pre.read_text()) if pre.is_file() else {}
    mean, std = pre_cfg.get("image_mean", CLIP_MEAN), pre_cfg.get("image_std", CLIP_STD)
    try:
        img = Image.open(image).convert("RGB").resize((side, side), Image.BICUBIC)
    except (OSError, ValueError) as e:
        raise InputError(f"{image}: not an image PIL can read ({e})") from None
    x = (np.asarray(img, np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))


def build_inputs(ckpt: Checkpoint, image: Path, prompt: str) -> dict[str, Any]:
    """``input_ids`` and ``pixel_values`` for one image and prompt, LLaVA's template
    (``USER: <image>\\n{prompt}\\nASSISTANT:``) with the image token repeated once per image feature."""
    import torch

    if ckpt.architecture not in FAMILIES:
        raise InputError(f"probe does not support {ckpt.architecture} yet (supported: {', '.join(FAMILIES)})")
    token = image_token_id(ckpt.config)
    vision = ckpt.config.get("vision_config") or {}
    side, patch = int(vision.get("image_size", 336)), int(vision.get("patch_size", 14))
    n_image = (side // patch) ** 2 + (ckpt.config.get("vision_feature_select_strategy") == "full")
    bos = (ckpt.config.get("text_config") or {}).get("bos_token_id", 1)
    ids = ([bos] if isinstance(bos, int) else []) + _text_ids(ckpt.path, "USER: ") + [token] * n_image + _text_ids(ckpt.path, f"\n{prompt}\nASSISTANT:")
    if token not in ids or ids[-1] == token:
        raise InputError("the prompt's template puts no image token before the text")
    return {"input_ids": torch.tensor([ids]), "pixel_values": _pixels(image, ckpt.path, side),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


def measure(input_ids, attentions, hidden_states, token: int, fraction: float) -> dict[str, Any]:
    """The per-layer numbers from one forward pass's outputs (batch 1)."""
    import torch

    ids = input_ids[0]
    is_image = ids == token
    image_pos = is_image.nonzero().flatten()
    if len(image_pos) == 0:
        raise InputError("the inputs hold no image token")
    first_text = int(image_pos[-1]) + 1
    if first_text >= len(ids):
        raise InputError("no text token follows the image")
    queries = torch.arange(first_text, len(ids))
    # image tokens' share of each text query's causal context, averaged: the share under uniform attention
    uniform = float((is_image.sum().double() / (queries.double() + 1)).mean())
    out: dict[str, Any] = {"image_tokens": int(is_image.sum()), "text_queries": len(queries),
                           "context": len(ids), "uniform_share": uniform,
                           "text_to_image": [], "normalized": [], "image_change": [], "text_change": []}
    for attn in attentions:  # (1, heads, q, k)
        rows = attn[0, :, first_text:, :].double()
        share = float((rows[..., is_image].sum(-1) / rows.sum(-1)).mean())
        out["text_to_image"].append(share)
        out["normalized"].append(share / uniform)
    text = ~is_image
    for before, after in zip(hidden_states[:-1], hidden_states[1:]):
        cos = torch.nn.functional.cosine_similarity(before[0].double(), after[0].double(), dim=-1)
        out["image_change"].append(float((1 - cos[is_image]).mean()))
        out["text_change"].append(float((1 - cos[text]).mean()))
    out["saturation_layer"] = saturation_layer(out["text_to_image"], fraction)
    return out


def saturation_layer(shares: list[float], fraction: float) -> int | None:
    """The first layer from which every share is below ``fraction`` x the first layer's, or None."""
    if not shares:
        return None
    bar = fraction * shares[0]
    for layer in range(1, len(shares)):
        if all(s < bar for s in shares[layer:]):
            return layer
    return None


def probe(hf_dir: str | Path, image: str | Path, prompt: str = DEFAULT_PROMPT,
          fraction: float = DEFAULT_FRACTION, model=None) -> ProbeReport:
    """One forward pass of ``hf_dir`` on ``image`` and ``prompt``; ``model`` a loaded one (tests)."""
    import torch

    if not 0 < fraction < 1:
        raise InputError(f"--fraction {fraction}: must be between 0 and 1")
    ckpt = Checkpoint(hf_dir)
    image = Path(image)
    if not image.is_file():
        raise InputError(f"{image}: no such file")
    inputs = build_inputs(ckpt, image, prompt)
    model = model if model is not None else load_model(ckpt)
    with torch.no_grad():
        result = model(**inputs, output_attentions=True, output_hidden_states=True, return_dict=True)
    if not result.attentions:
        raise InputError(f"{ckpt.architecture}: transformers returned no attention weights")
    numbers = measure(inputs["input_ids"], result.attentions, result.hidden_states,
                      image_token_id(ckpt.config), fraction)
    return ProbeReport(checkpoint=str(ckpt.path), architecture=ckpt.architecture, fraction=fraction, **numbers)


def plotting():
    """matplotlib's pyplot (non-interactive), or the InputError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(reports: list[ProbeReport], path: Path) -> None:
    """The share and change curves of one or more reports in one PNG (matplotlib)."""
    plt = plotting()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in reports:
        label = Path(r.checkpoint).name
        top.plot(r.text_to_image, marker="o", label=label)
        bottom.plot(r.image_change, marker="o", label=f"{label} image")
        bottom.plot(r.text_change, linestyle="--", label=f"{label} text")
    top.set_ylabel("text→image attention share")
    bottom.set_ylabel("1 − cos to previous layer")
    bottom.set_xlabel("language-model layer")
    top.legend()
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
