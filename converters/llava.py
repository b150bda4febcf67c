"""LLaVA-1.5 (and LLaVA-style) checkpoints with a CLIP vision tower -> projector ``mlp``.

What is special here:
- llama.cpp feeds the projector from the input of the last block it runs.  With no
  ``clip.vision.feature_layer`` key it runs ``block_count - 1`` blocks, which is exactly
  ``vision_feature_layer = -2`` with every block written (the established llava-1.5 form).
  Any other choice is written explicitly as absolute hidden-state indices, and blocks past
  the deepest one are left out.
- ``post_layernorm`` is not used by LLaVA (it reads hidden states), so it is left out.
- the projector's ``linear_1``/``linear_2`` are llama.cpp's ``mm.0``/``mm.2`` (GELU between).
- llama.cpp drops the CLS row (strategy ``default``); ``full`` cannot be expressed.

llama.cpp's runtime (llama-cpp-python 0.3.36 included) concatenates CLS *after* the patches
while still adding positions 0..n and reading rows 1..n, so each patch gets its neighbour's
position embedding, patch 0 is dropped and CLS is emitted (ggml-org/llama.cpp#25814, fix
proposed in #25844).  No file can compensate; ``runtime_reference`` runs transformers' own
modules in that order so that ``verify`` can tell a runtime defect from a conversion error.
"""
from __future__ import annotations

import re

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ggraft.errors import UnsupportedModelError
from ._image_norms import CLIP_MEAN, CLIP_STD

FEATURE_LAYER_KEY = "clip.vision.feature_layer"  # clip-impl.h KEY_FEATURE_LAYERS; not in gguf-py 0.19
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


@register
class LlavaClip(Converter):
    architectures = ("LlavaForConditionalGeneration",)
    projector_type = gguf.constants.VISION_PROJECTOR_TYPE_NAMES[gguf.constants.VISION_PROJECTOR_TYPE.MLP]
    family = "LLaVA-1.5 (CLIP)"
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

    @classmethod
    def refuses(cls, config):
        kind = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
        if kind != "clip_vision_model":
            return f"vision tower {kind!r} is not CLIP (this converter takes LLaVA with CLIP)"
        if config.get("vision_feature_select_strategy", "default") != "default":
            return "vision_feature_select_strategy 'full' (keeping CLS) has no llama.cpp equivalent"
        return None

    def feature_layers(self) -> list[int]:
        """Absolute hidden-state indices (0 = embeddings) that feed the projector, ascending."""
        n = self.vision_config.get("num_hidden_layers", 24)
        chosen = self.config.get("vision_feature_layer", -2)
        chosen = chosen if isinstance(chosen, list) else [chosen]
        absolute = [k if k >= 0 else n + 1 + k for k in chosen]
        if absolute != sorted(absolute) or not all(0 < k <= n for k in absolute):
            raise UnsupportedModelError(f"vision_feature_layer {chosen} cannot be expressed for llama.cpp")
        return absolute

    def params(self) -> VisionParams:
        v = self.vision_config
        n = v.get("num_hidden_layers", 24)
        layers = self.feature_layers()
        established = layers == [n - 1]
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)
        return VisionParams(
            image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
            embedding_length=v.get("hidden_size", 768), feed_forward_length=v.get("intermediate_size", 3072),
            block_count=n if established else max(layers), head_count=v.get("num_attention_heads", 12),
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
            projection_dim=self.text_config.get("hidden_size", 4096),
            image_mean=mean, image_std=std,
            use_gelu=v.get("hidden_act", "quick_gelu") == "gelu",
            extra={} if established else {FEATURE_LAYER_KEY: layers},
        )

    def skip(self, canonical):
        if canonical.startswith("vision_tower.vision_model.post_layernorm."):
            return True
        block = _BLOCK.search(canonical)
        return block is not None and int(block.group(1)) >= self.params().block_count

    def rename(self, canonical):
        # linear_1 / linear_2 are llama.cpp's mm.0 / mm.2
        m = re.fullmatch(r"multi_modal_projector\.linear_([12])\.(weight|bias)", canonical)
        if m:
            return f"mm.{2 * int(m.group(1)) - 2}.{m.group(2)}"
        return super().rename(canonical)

    def reference_features(self, model, pixel_values):
        return model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=self.config.get("vision_feature_layer", -2),
            vision_feature_select_strategy=self.config.get("vision_feature_select_strategy", "default"),
        )


    def runtime_reference(self, model, pixel_values):
        import torch

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
