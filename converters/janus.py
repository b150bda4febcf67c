"""Janus-Pro (SigLIP-style vision tower + aligner MLP, understanding path) -> projector ``janus_pro``.

Only the understanding path is an mmproj: ``vision_model`` (patch conv, learned positions, no
CLS, pre-norm blocks, ``post_layernorm`` on the last hidden state) and ``aligner`` (``fc1``, act,
``hidden_layers.0``).  The image-generation parts (``vqmodel``, ``generation_embeddings``,
``generation_aligner``, ``generation_head``) and the language model lie outside the vision
prefixes and are skipped without being read.

What is special here:
- the aligner is ``mm.0`` (``fc1``) and ``mm.1`` (``hidden_layers.0``), named here: gguf-py's
  TensorNameMap has one Janus row for it (``model.aligner.fc1.hidden_layers.{bid}``), a name no
  checkpoint holds.  llama.cpp runs exactly fc1, act, fc2, so ``depth`` other than 2 is refused.
- one activation (the vision config's ``hidden_act``) serves the blocks and the aligner, as in
  llama.cpp (``hparams.ffn_op``).  transformers' default ``gelu`` is exact, llama.cpp's GELU the
  tanh form (min cosine 0.9999998 at f32 on the tiny fixture).  llama.cpp's converter writes
  ``use_gelu`` for ``gelu`` only: ``gelu_pytorch_tanh`` gets GELU-quick (0.99985); ggraft's is exact.
- the attention output is ``projection_layer`` (TensorNameMap's Janus row); the FFN width is
  ``int(hidden_size * mlp_ratio)``; q/k norms (``use_qk_norm``) have no place in llama.cpp's graph.
- positions are not resized by llama.cpp for janus_pro: the grid must be whole (image_size a
  multiple of patch_size), and images are resized (bicubic) and padded to ``image_size`` first.

Layouts: ``JanusForConditionalGeneration`` as transformers saves it (``model.vision_model.*``,
``model.aligner.*``; the hub's deepseek-community checkpoints) and the bare ``JanusModel``
(``vision_model.*``, ``aligner.*``).

llama.cpp's runtime and transformers differ outside the embeddings: mtmd.cpp (``init_vision``,
``case PROJECTOR_TYPE_JANUS_PRO`` at line 639) inserts no text around an image, where
transformers' JanusProcessor (``replace_image_token``) writes ``<begin_of_image>``, the image
tokens and ``<end_of_image>``.  Preprocessing pads non-square images with grey 127 in llama.cpp
and with ``image_mean * 255`` in transformers (the same for the released 0.5 mean).
"""
from __future__ import annotations

import re

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect

from ._image_norms import ACTIVATIONS, CLIP_MEAN, CLIP_STD

TOWER, ALIGNER = "model.vision_model.", "model.aligner."
MM = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ]
ALIGNER_LAYERS = {"fc1": 0, "hidden_layers.0": 1}  # -> mm.0, mm.1: llama.cpp's janus_pro aligner
ALIGNER_LAYER = re.compile(re.escape(ALIGNER) + r"(?P<layer>fc1|hidden_layers\.0)\.(?P<kind>weight|bias)")
#: what llama.cpp computes for transformers' hidden_act (clip.cpp: use_gelu / use_silu, else GELU-quick)
#: transformers' JanusVisionConfig defaults
DEFAULTS = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16, image_size=384,
                layer_norm_eps=1e-6, hidden_act="gelu", mlp_ratio=4.0, projection_dim=2048, depth=2, use_qk_norm=False)


def _vision(config):
    """``vision_config``'s values (checked as read), a missing key taking JanusVisionConfig's default."""
    v = config.get("vision_config") or {}
    return lambda key: v.get(key, DEFAULTS[key])


@register
class Janus(Converter):
    architectures = ("JanusForConditionalGeneration", "JanusModel")
    projector_type = gguf.VisionProjectorType.JANUS_PRO
    family = "Janus-Pro"
    image_tokens = ("<begin_of_image>", "<image_placeholder>", "<end_of_image>")
    convention = Convention("Janus-Pro", image_tokens)
    runtime_defects = (RuntimeDefect(
        "janus_pro", "mtmd puts no <begin_of_image>/<end_of_image> around a janus_pro image, where transformers' "
        "JanusProcessor writes them: the model reads its image without the markers it was trained with", "tools/mtmd/mtmd.cpp:639 (no img_beg/img_end for "
        "PROJECTOR_TYPE_JANUS_PRO)", seen_up_to="0.3.36", affects="prompt"),)
    vision_prefixes = (TOWER, ALIGNER)
    layout_aliases = (("vision_model.", TOWER), ("aligner.", ALIGNER))  # the bare JanusModel

    @classmethod
    def refuses(cls, config):
        v = _vision(config)
        if v("hidden_act") not in ACTIVATIONS:
            return f"vision activation {v('hidden_act')!r} has no llama.cpp equivalent"
        if v("depth") != 2:
            return f"aligner depth {v('depth')}: llama.cpp's janus_pro graph runs exactly two linear layers"
        if v("use_qk_norm"):
            return "use_qk_norm: llama.cpp's janus_pro graph has no q/k norms"
        if v("image_size") % v("patch_size"):
            return (f"image_size {v('image_size')} is not a multiple of patch_size {v('patch_size')} "
                    "(llama.cpp's grid of patches must cover the image)")
        return None

    def params(self) -> VisionParams:
        v = _vision(self.config)
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # JanusImageProcessor's defaults
        return VisionParams(
            image_size=v("image_size"), patch_size=v("patch_size"), embedding_length=v("hidden_size"),
            feed_forward_length=int(v("hidden_size") * v("mlp_ratio")), block_count=v("num_hidden_layers"),
            head_count=v("num_attention_heads"), layer_norm_eps=v("layer_norm_eps"),
            projection_dim=v("projection_dim"), image_mean=mean, image_std=std, **ACTIVATIONS[v("hidden_act")],
        )

    def rename(self, canonical):
        if canonical.startswith(ALIGNER):
            m = ALIGNER_LAYER.fullmatch(canonical)  # anything else (a third layer) is unmappable
            return m and f"{MM.format(bid=ALIGNER_LAYERS[m['layer']])}.{m['kind']}"
        return super().rename(canonical)

    def reference_features(self, model, pixel_values):
        """The aligner's output (``pooler_output``), which JanusModel's forward puts at the image tokens;
        JanusForConditionalGeneration reaches it through its ``model``."""
        base = model if hasattr(model, "get_image_features") else model.model
        return base.get_image_features(pixel_values=pixel_values)
