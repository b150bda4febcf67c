"""``ggraft probe``: where a VLM's language model stops looking at the image (the DPVR curve).

One forward pass in transformers (eager attention, ``output_attentions`` and ``output_hidden_states``)
on one image and prompt gives, per language-model layer, the share of text queries' attention that
lands on image keys, that share over the image tokens' share of the causal context (1.0 = uniform),
and how much image and text tokens' hidden states still change (1 - cosine to the previous layer).
transformers and torch are needed here only (``ggraft[verify]``).
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ggraft.errors import InputError
from ggraft.hf.checkpoint import Checkpoint, read_json, vision_language_config

#: default --fraction: DPVR's LLaVA-1.5 share falls from 0.68 to 0.07 by layer 4 (about 0.1 of the
#: first layer) and to 0.04 after; a quarter marks the end of that fall, not noise in the tail
DEFAULT_FRACTION = 0.25
DEFAULT_PROMPT = "Describe the image."
#: the prompt when the checkpoint carries no chat template; IMAGE_SLOT is where the image goes
IMAGE_SLOT = "\x00image\x00"
FALLBACK_TEMPLATE = "USER: " + IMAGE_SLOT + "\n{prompt}\nASSISTANT:"


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
    """The checkpoint in transformers, with eager attention (which returns attention weights)."""
    from ggraft.jobs.verify import load_reference_model
    from ggraft.mmproj.converter import converter_for

    return load_reference_model(ckpt, converter_for(ckpt).reference_class(), attn_implementation="eager")


def image_token_id(config: dict[str, Any]) -> int:
    config = vision_language_config(config)
    for key in ("image_token_id", "image_token_index"):
        if isinstance(config.get(key), int):
            return config[key]
    raise InputError("the checkpoint's config names no image token (image_token_id / image_token_index): "
                     "its inputs would hold no image to measure attention on")


def chat_template(ckpt: Checkpoint) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja = ckpt.path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        found = read_json(ckpt.path / name, name).get("chat_template") if (ckpt.path / name).is_file() else None
        if isinstance(found, list):  # named templates: the default one
            found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(found, str):
            return found
    return None


def language_model(model):
    """The module whose forward reads the image: an omni model's thinker, else the model."""
    return getattr(model, "thinker", model)


def render_prompt(ckpt: Checkpoint, prompt: str, template: str | None) -> str:
    """One user turn (an image, then ``prompt``) through the checkpoint's chat template, with the
    generation prompt; LLaVA's plain ``USER: <image>...ASSISTANT:`` when it carries none.  The image
    part is transformers' ``{"type": "image"}``, or llama.cpp's ``image_url`` for templates that
    only know that one."""
    if template is None:
        return FALLBACK_TEMPLATE.format(prompt=prompt)
    from ggraft.pair.chat_template import render_user_turn

    special = {k: v if isinstance(v, str) else (v or {}).get("content", "")
               for k, v in ckpt.tokenizer_config.items() if k in ("bos_token", "eos_token")}

    def render(*parts: dict[str, Any]) -> str:
        message = {"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}
        return render_user_turn(template, message, bos=special.get("bos_token", ""), eos=special.get("eos_token", ""))

    try:
        text_only = render()
        for image in ({"type": "image"}, {"type": "image_url", "image_url": {"url": "file:///probe.png"}}):
            if (text := render(image)) != text_only:
                return text
        return text_only  # refused by expand_image: no image token
    except Exception as e:  # a template is code: any failure is the checkpoint's
        raise InputError(f"{ckpt.path}: its chat template does not render one image and a prompt "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


class Tokenizer:
    """Text to ids: added (special) tokens matched whole, the text between them by the checkpoint's
    sentencepiece model or, without one, by transformers' tokenizer."""

    def __init__(self, ckpt: Checkpoint):
        self.added = {text: tid for text, (tid, _special) in ckpt.added_tokens().items()}
        spm = ckpt.path / "tokenizer.model"
        if spm.is_file():
            import sentencepiece

            self._spm = sentencepiece.SentencePieceProcessor(model_file=str(spm))
            self.added = {self._spm.id_to_piece(i): i for i in range(self._spm.get_piece_size())
                          if self._spm.is_control(i)} | self.added  # user-defined pieces: encode keeps them whole
            self._encode = lambda text: list(self._spm.encode(text))
            return
        if not any((ckpt.path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            raise InputError(f"{ckpt.path}: no tokenizer (tokenizer.model, tokenizer.json or tokenizer_config.json)")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(ckpt.path)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{ckpt.path}: no tokenizer transformers can read ({str(e).splitlines()[0][:200]})") from None
        self._encode = lambda text: list(tok.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        names = sorted((t for t in self.added if t), key=len, reverse=True)
        start = 0
        while start < len(text):
            hit = min(((at, -len(t), t) for t in names if (at := text.find(t, start)) >= 0), default=None)
            end = hit[0] if hit else len(text)
            if end > start:
                ids += self._encode(text[start:end])
            if not hit:
                break
            ids.append(self.added[hit[2]])
            start = end + len(hit[2])
        return ids


def expand_image(ids: list[int], image_id: int, placeholders: list[int], n_image: int) -> list[int]:
    """``ids`` with the image's ``n_image`` feature positions: the image token where the template
    wrote it, else after the family's placeholder (Gemma's ``<start_of_image>``, Llama 4's
    ``<|image|>``), as the family's processor expands it."""
    if image_id in ids:
        at = ids.index(image_id)
        return ids[:at] + [image_id] * n_image + [t for t in ids[at + 1:] if t != image_id]
    at = next((i for i, t in enumerate(ids) if t in placeholders), None)
    if at is None:
        raise InputError("the prompt's chat template puts no image token in the prompt: "
                         "there is no image for the text to attend to")
    return ids[:at + 1] + [image_id] * n_image + ids[at + 1:]


def build_inputs(ckpt: Checkpoint, image: Path, prompt: str, model) -> dict[str, Any]:
    """The forward's arguments for one image and prompt: the image at the family's own size (as
    ``verify`` feeds it, laid out by the converter's ``model_inputs``) and the prompt through the
    chat template with the image token once per image feature."""
    import torch

    from ggraft.jobs.verify import as_rows, pixel_values
    from ggraft.mmproj.converter import converter_for

    conv = converter_for(ckpt)
    token = image_token_id(ckpt.config)
    pv = pixel_values(load_image(image, *conv.test_image_size()), conv.params().image_mean, conv.params().image_std)
    images = conv.model_inputs(pv)
    with torch.no_grad():  # the tower alone, to count the features the forward scatters: a fraction of it
        lm = language_model(model)
        features = getattr(lm, "get_image_features", None) or getattr(getattr(lm, "model", None),
                                                                      "get_image_features", None)  # dots3-note
        if features is None:
            raise InputError(f"{ckpt.architecture}: transformers' model has no get_image_features to count "
                             "the image's features")
        n_image = as_rows(features(**images)).shape[0]
    tok = Tokenizer(ckpt)
    template = chat_template(ckpt)
    text = render_prompt(ckpt, prompt, template)
    ids = [] if template else [b for b in [bos_id(ckpt)] if b is not None]
    if IMAGE_SLOT in text:
        before, after = text.split(IMAGE_SLOT, 1)
        ids += tok.encode(before) + [token] + tok.encode(after)
    else:
        ids += tok.encode(text)
    placeholders = [tok.added[t] for t in conv.image_tokens if t in tok.added]
    ids = expand_image(ids, token, placeholders, n_image)
    if ids[-1] == token:
        raise InputError("the prompt's chat template puts no text after the image")
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              **images}
    for mask in ("token_type_ids", "mm_token_type_ids"):  # families that mark image positions so
        if mask in inspect.signature(language_model(model).forward).parameters:
            inputs[mask] = (inputs["input_ids"] == token).long()
    return inputs


def bos_id(ckpt: Checkpoint) -> int | None:
    config = vision_language_config(ckpt.config)
    bos = (config.get("text_config") or {}).get("bos_token_id", config.get("bos_token_id"))
    return bos if isinstance(bos, int) else None


def load_image(image: Path, height: int, width: int):
    import numpy as np
    from PIL import Image

    try:
        img = Image.open(image).convert("RGB").resize((width, height), Image.BICUBIC)
    except (OSError, ValueError) as e:
        raise InputError(f"{image}: not an image PIL can read ({e})") from None
    return np.asarray(img, np.uint8)


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
    for attn in attentions:  # (1, heads, q, k); None for layers without softmax attention
        if attn is None:
            out["text_to_image"].append(None)
            out["normalized"].append(None)
            continue
        rows = attn[0, :, first_text:, :].double()
        share = float((rows[..., is_image].sum(-1) / rows.sum(-1)).mean())
        out["text_to_image"].append(share)
        out["normalized"].append(share / uniform)
    # multi-stream residuals (GLM-5 Next's mHC: (1, seq, streams, hidden)) are compared as their mean
    hidden_states = [h.mean(-2) if h.dim() == 4 else h for h in hidden_states]
    text = ~is_image
    for before, after in zip(hidden_states[:-1], hidden_states[1:]):
        cos = torch.nn.functional.cosine_similarity(before[0].double(), after[0].double(), dim=-1)
        out["image_change"].append(float((1 - cos[is_image]).mean()))
        out["text_change"].append(float((1 - cos[text]).mean()))
    out["saturation_layer"] = saturation_layer(out["text_to_image"], fraction)
    return out


def per_layer(attentions: list, n_layers: int, layer_types: list[str] | None) -> list:
    """The attention weights of each language-model layer, None for layers without softmax
    attention (LFM2's convolutions, Qwen3.5's linear attention), which transformers leaves out."""
    if len(attentions) == n_layers:
        return attentions
    attending = [i for i, kind in enumerate(layer_types or []) if "attention" in kind and "linear" not in kind]
    if len(attending) != len(attentions) or len(layer_types or []) != n_layers:
        raise InputError(f"transformers returned attention weights for {len(attentions)} of {n_layers} layers "
                         "and the config's layer_types does not say which")
    weights = dict(zip(attending, attentions))
    return [weights.get(i) for i in range(n_layers)]


def saturation_layer(shares: list[float | None], fraction: float) -> int | None:
    """The first layer from which every share is below ``fraction`` x the first layer's, or None
    (layers without softmax attention, None, are passed over)."""
    measured = [(layer, s) for layer, s in enumerate(shares) if s is not None]
    if not measured:
        return None
    bar = fraction * measured[0][1]
    for k in range(1, len(measured)):
        if all(s < bar for _, s in measured[k:]):
            return measured[k][0]
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
    image_token_id(ckpt.config)  # refused before the model loads
    model = model if model is not None else load_model(ckpt)
    inputs = build_inputs(ckpt, image, prompt, model)
    result = forward(language_model(model), inputs, ckpt.architecture)
    if not result.attentions:
        raise InputError(f"{ckpt.architecture}: transformers returned no attention weights")
    section = vision_language_config(ckpt.config)
    text_config = section.get("text_config") or section
    attentions = per_layer(list(result.attentions), len(result.hidden_states) - 1,  # NemotronH: layers_block_type
                           text_config.get("layer_types") or text_config.get("layers_block_type"))
    numbers = measure(inputs["input_ids"], attentions, result.hidden_states, image_token_id(ckpt.config), fraction)
    return ProbeReport(checkpoint=str(ckpt.path), architecture=ckpt.architecture, fraction=fraction, **numbers)


def forward(model, inputs: dict[str, Any], architecture: str):
    """One forward pass with attention weights and hidden states. Where the wrapper fails after its
    text model ran, that text model's output (it holds both): Llama 4 in transformers 5.24, whose
    forward reads ``image_outputs`` from a text-model output that has none (modeling_llama4.py:1318)."""
    import torch

    ran = []
    try:
        text_model = model.get_decoder()
    except Exception:  # noqa: BLE001 -- a model without one: no fallback, the forward decides
        text_model = None
    hook = text_model.register_forward_hook(lambda _m, _a, out: ran.append(out)) \
        if isinstance(text_model, torch.nn.Module) else None
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True, output_hidden_states=True, return_dict=True)
    except AttributeError as e:
        if ran and getattr(ran[-1], "attentions", None) and getattr(ran[-1], "hidden_states", None):
            return ran[-1]
        raise InputError(f"{architecture}: transformers' forward failed (AttributeError: {str(e)[:160]})") from None
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise InputError(f"{architecture}: transformers' forward failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    finally:
        if hook is not None:
            hook.remove()


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
        top.plot([float("nan") if v is None else v for v in r.text_to_image], marker="o", label=label)
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
