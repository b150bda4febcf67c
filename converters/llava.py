"""LLaVA-1.5 (and LLaVA-style) checkpoints with a CLIP or SigLIP vision tower -> projector ``mlp``.

What is special here:
- llama.cpp feeds the projector from the input of the last block it runs.  With no
  ``clip.vision.feature_layer`` key it runs ``block_count - 1`` blocks, which is exactly
  ``vision_feature_layer = -2`` with every block written (the established llava-1.5 form).
  Any other choice is written explicitly as absolute hidden-state indices, and blocks past
  the deepest one are left out.
- ``post_layernorm`` is not used by LLaVA (it reads hidden states), so it is left out.
- the projector's ``linear_1``/``linear_2`` are llama.cpp's ``mm.0``/``mm.2`` (GELU between);
  ``multimodal_projector_bias: false``: llama.cpp adds ``mm.0``/``mm.2`` biases unconditionally
  (models/llava.cpp:167), so zero biases are written.
- a CLIP tower's CLS row is dropped by llama.cpp (strategy ``default``); a SigLIP tower has no CLS,
  so ``full`` is what llama.cpp runs without a class embedding (clip.cpp:5202).  ``default`` on
  SigLIP would drop a real patch and is refused, as is ``full`` on CLIP.  SigLIP's pooling ``head``
  is left out.

llama.cpp's runtime (llama-cpp-python 0.3.36 included) concatenates CLS *after* the patches
while still adding positions 0..n and reading rows 1..n, so each patch gets its neighbour's
position embedding, patch 0 is dropped and CLS is emitted (ggml-org/llama.cpp#25814, fix
proposed in #25844).  No file can compensate; ``runtime_reference`` runs transformers' own
modules in that order so that ``verify`` can tell a runtime defect from a conversion error.  A SigLIP
tower has no CLS: nothing for that defect to touch.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from ggraft.mmproj.converter import Converter, VisionParams, in_memory, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ggraft.errors import UnsupportedModelError
from ._image_norms import ACTIVATIONS, CLIP_MEAN, CLIP_STD, GELU_ACTS

FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # clip-impl.h KEY_FEATURE_LAYERS; not in gguf-py 0.19
_BLOCK = re.compile(r"\.layers\.(\d+)\.")
#: transformers' vision config class defaults, by model_type (a vision_config that omits a key)
TOWERS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
STRATEGY = {"clip_vision_model": "default", "siglip_vision_model": "full"}  # what llama.cpp's graph runs


@register
class LlavaClip(Converter):
    architectures = ("LlavaForConditionalGeneration",)
    projector_type = gguf.constants.VISION_PROJECTOR_TYPE_NAMES[gguf.constants.VISION_PROJECTOR_TYPE.MLP]
    family = "LLaVA-1.5 (CLIP or SigLIP)"
    image_tokens = ("<image>",)
    convention = Convention("LLaVA", ("<image>",))
    runtime_defects = (RuntimeDefect(
        "mlp", "llama.cpp's llava graph puts CLS after the patches: every patch gets its neighbour's position "
        "embedding, patch 0 is dropped and the projected CLS is fed to the model",
        "ggml-org/llama.cpp#25814", seen_up_to="0.3.36", with_tensor="v.class_embd"),)
    layout_aliases = (
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("vision_tower.vision_model.", "vision_tower.vision_model."),
        ("vision_tower.", "vision_tower.vision_model."),  # transformers 5 drops `vision_model.`
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )

    #: the config class's defaults (LlavaConfig) and its vision_config when there is none
    defaults = dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                    multimodal_projector_bias=True)
    default_tower = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                         num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14)

    @classmethod
    def settings(cls, config) -> tuple[dict, dict]:
        """(top-level settings, vision settings), each missing key at transformers' default."""
        top = {k: config.get(k, d) for k, d in cls.defaults.items()}
        given = config.get("vision_config") or {}
        kind = given.get("model_type", cls.default_tower["model_type"])
        base = {**TOWERS.get(kind, {}), **({} if given else cls.default_tower), "model_type": kind}
        return top, {k: given.get(k, d) for k, d in base.items()}

    @classmethod
    def refuses(cls, config):
        top, v = cls.settings(config)
        kind = v["model_type"]
        if kind not in TOWERS:
            return f"vision tower {kind!r} is neither CLIP nor SigLIP (llama.cpp's llava graph runs those)"
        if top["vision_feature_select_strategy"] != STRATEGY[kind]:
            return (f"vision_feature_select_strategy {top['vision_feature_select_strategy']!r} on a {kind} tower: "
                    f"llama.cpp keeps exactly the patches ({STRATEGY[kind]!r})")
        if v["hidden_act"] not in ACTIVATIONS:
            return f"vision activation {v['hidden_act']!r} has no llama.cpp equivalent"
        if top["projector_hidden_act"] not in GELU_ACTS:
            return f"projector_hidden_act {top['projector_hidden_act']!r}: llama.cpp's mlp projector applies GELU"
        return None

    def feature_layers(self) -> list[int]:
        """Absolute hidden-state indices (0 = embeddings) that feed the projector, ascending."""
        top, v = self.settings(self.config)
        n, chosen = v["num_hidden_layers"], top["vision_feature_layer"]
        chosen = chosen if isinstance(chosen, list) else [chosen]
        absolute = [k if k >= 0 else n + 1 + k for k in chosen]
        if absolute != sorted(absolute) or not all(0 < k <= n for k in absolute):
            raise UnsupportedModelError(f"vision_feature_layer {chosen} cannot be expressed for llama.cpp")
        return absolute

    def params(self) -> VisionParams:
        top, v = self.settings(self.config)
        n, layers = v["num_hidden_layers"], self.feature_layers()
        established = layers == [n - 1]  # llama.cpp's default: the input of the last block
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # the image processors' defaults
        return VisionParams(
            image_size=v["image_size"], patch_size=v["patch_size"], embedding_length=v["hidden_size"],
            feed_forward_length=v["intermediate_size"], block_count=n if established else max(layers),
            head_count=v["num_attention_heads"], layer_norm_eps=v["layer_norm_eps"],
            projection_dim=self.text_config.get("hidden_size", 4096), image_mean=mean, image_std=std,
            **ACTIVATIONS[v["hidden_act"]], extra={} if established else {FEATURE_LAYER_KEY: layers})

    def skip(self, canonical):
        if canonical.startswith(("vision_tower.vision_model.post_layernorm.", "vision_tower.vision_model.head.")):
            return True
        block = _BLOCK.search(canonical)
        return block is not None and int(block.group(1)) >= self.params().block_count

    def extra_tensors(self):
        yield from super().extra_tensors()
        if not self.settings(self.config)[0]["multimodal_projector_bias"]:
            zeros = in_memory(np.zeros(self.params().projection_dim, np.float32))
            for i in (0, 2):
                yield f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=i)}.bias", zeros

    def rename(self, canonical):
        # linear_1 / linear_2 are llama.cpp's mm.0 / mm.2
        m = re.fullmatch(r"multi_modal_projector\.linear_([12])\.(weight|bias)", canonical)
        if m:
            return f"mm.{2 * int(m.group(1)) - 2}.{m.group(2)}"
        return super().rename(canonical)

    def reference_features(self, model, pixel_values):
        top = self.settings(self.config)[0]
        return model.get_image_features(pixel_values=pixel_values, vision_feature_layer=top["vision_feature_layer"],
                                        vision_feature_select_strategy=top["vision_feature_select_strategy"])

    @property
    def runtime_note(self):
        return "; ".join(f"{d.summary} ({d.reference})" for d in LlavaClip.runtime_defects)

    def runtime_reference(self, model, pixel_values):
        """transformers run with llama.cpp's CLS order; None for a tower without CLS (SigLIP)."""
        import torch

        if self.settings(self.config)[1]["model_type"] != "clip_vision_model":
            return None

        tower = model.model.vision_tower
        vm = getattr(tower, "vision_model", tower)
        emb = vm.embeddings
        patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([patches, emb.class_embedding.expand(patches.shape[0], 1, -1)], 1)
        x = vm.pre_layrnorm(x + emb.position_embedding.weight[None, : x.shape[1]])
        hidden = [x]
        for layer in vm.encoder.layers:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out
            hidden.append(x)
        chosen = [hidden[k][:, 1:] for k in self.feature_layers()]
        return model.model.multi_modal_projector(torch.cat(chosen, -1))
