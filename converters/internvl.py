"""InternVL 2.5 / 3 (InternViT, pixel shuffle, ``mlp1`` projector) -> projector ``internvl``.

Layouts: transformers' ``InternVLForConditionalGeneration`` (``vision_tower.*``,
``multi_modal_projector.*``, as 4.x and 5.x save it, or ``model.``-prefixed as Intern-S1 ships) and
the layout most hub checkpoints still ship, OpenGVLab's remote-code ``InternVLChatModel``
(``vision_model.*`` with a fused ``attn.qkv``, ``mlp1.*``, ``llm_config``, ``select_layer``,
``ps_version``); all write the same tensors, in the same order.

What is special here:
- llama.cpp's internvl graph appends CLS *after* the patches yet adds the position rows in
  stored order, so with the checkpoint's order (CLS's row first, as llama.cpp's converter writes
  it) each patch gets its left neighbour's position and CLS the last patch's.  The graph drops CLS
  after the tower and attention does not depend on order, so the file compensates exactly: the
  rows are stored patches first, CLS's last.
- the projector is LayerNorm (eps 1e-5 on both sides), Linear, GELU, Linear: ``mm.model.mlp.0/1/3``.
- llama.cpp reads layer scale (``ls1``/``ls2``; transformers' ``lambda_1/2``) and the position
  embedding as ``.weight``; a fused ``attn.qkv`` is split into q, k, v.
- llama.cpp runs RMS norm only at the 6B InternViT's shape (width 3200, 45 blocks) and normalizes
  q/k with the tower's norm type: other combinations, pixel shuffle v1, a CLS-keeping feature
  strategy and a tower without position embeddings are refused.
- features from an earlier block: later blocks are left out (llama.cpp runs every block it has);
  the tower's final norm (``use_mean_pooling: false``) only follows the last block.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from ggraft.errors import InputError, UnsupportedModelError
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention

from ._image_norms import ACTIVATIONS, GELU_ACTS, IMAGENET_MEAN, IMAGENET_STD

TOWER, ORIGINAL_TOWER, PROJECTOR = "model.vision_tower.", "vision_tower.vision_model.", "mlp1."
T, K = gguf.MODEL_TENSOR, gguf.Keys.ClipVision
POSITIONS = gguf.TENSOR_NAMES[T.V_ENC_EMBD_POS] + ".weight"
SUFFIXLESS = (gguf.TENSOR_NAMES[T.V_ENC_EMBD_CLS],)  # the one vision tensor llama.cpp names without .weight
QKV = re.compile(re.escape(ORIGINAL_TOWER) + r"encoder\.layers\.(?P<bid>\d+)\.attn\.qkv\.(?P<kind>weight|bias)")
QKV_SPLIT = re.compile(gguf.TENSOR_NAMES[T.V_ENC_ATTN_QKV].replace(".", r"\.").format(bid=r"(?P<bid>\d+)")
                       + r"\.(?P<kind>weight|bias)")
MLP = re.compile(r"mlp1\.(?P<index>[013])\.(?P<kind>weight|bias)")  # gguf-py maps mlp1.{bid} only below block_count
BLOCK = re.compile(r"\.layers?\.(\d+)\.")
RMS_SHAPE = (3200, 45)  # (width, blocks) of the 6B InternViT, the one shape llama.cpp runs with RMS norm


@register
class InternVL(Converter):
    architectures = ("InternVLForConditionalGeneration", "InternVLChatModel")
    projector_type = gguf.VisionProjectorType.INTERNVL
    family = "InternVL"
    image_tokens = ("<img>", "</img>", "<IMG_CONTEXT>")
    convention = Convention("InternVL", image_tokens)
    vision_prefixes = (TOWER, ORIGINAL_TOWER, PROJECTOR, "multi_modal_projector.")
    layout_aliases = (
        *((f"{prefix}multi_modal_projector.{name}.", f"mlp1.{index}.") for prefix in ("model.", "")
          for name, index in (("layer_norm", 0), ("linear_1", 1), ("linear_2", 3))),
        ("vision_tower.", TOWER),  # transformers' save_pretrained, 4.x and 5.x
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("vision_model.", ORIGINAL_TOWER),  # OpenGVLab's InternVLChatModel
    )

    @classmethod
    def refuses(cls, config):
        v = config.get("vision_config") or {}
        width, blocks = v.get("hidden_size", 1024), v.get("num_hidden_layers", 24)
        rms, norm = (width, blocks) == RMS_SHAPE, v.get("norm_type", "layer_norm")
        if norm != ("rms_norm" if rms else "layer_norm"):
            return (f"norm_type {norm!r} at width {width} with {blocks} blocks (llama.cpp runs RMS norm exactly "
                    f"when width is {RMS_SHAPE[0]} and blocks {RMS_SHAPE[1]}, the 6B InternViT)")
        if v.get("use_qk_norm", v.get("qk_normalization", False)) and not rms:  # transformers' name, OpenGVLab's
            return "q/k norms in a layer-norm tower (llama.cpp would normalize q and k with LayerNorm)"
        if config.get("ps_version", "v2") != "v2":
            return f"ps_version {config['ps_version']!r} (llama.cpp's pixel shuffle is v2's)"
        if config.get("vision_feature_select_strategy", "default") != "default":
            return "vision_feature_select_strategy 'full' (keeping CLS) has no llama.cpp equivalent"
        if not v.get("use_absolute_position_embeddings", True):
            return "a tower without absolute position embeddings (llama.cpp's internvl graph adds them)"
        if v.get("hidden_act", "gelu") not in ACTIVATIONS:
            return f"vision activation {v['hidden_act']!r} has no llama.cpp equivalent"
        if config.get("projector_hidden_act", "gelu") not in GELU_ACTS:
            return f"projector activation {config['projector_hidden_act']!r} (llama.cpp's internvl projector runs GELU)"
        return None

    def square(self, key: str, default: int) -> int:
        """An image or patch side (transformers saves InternVL's as [height, width])."""
        value = dict.get(self.vision_config, key, default)  # as saved: the config check wants a plain integer
        side = value[0] if isinstance(value, list) and len(value) == 2 and value[0] == value[1] else value
        if not isinstance(side, int) or isinstance(side, bool) or not 0 < side <= 1 << 15:
            raise UnsupportedModelError(f"{self.ckpt.path}: vision {key} {value} is not square (llama.cpp's are)")
        return side

    def feature_layer(self) -> int:
        """The hidden state that feeds the projector (transformers' key, or OpenGVLab's)."""
        return self.config.get("vision_feature_layer", self.config.get("select_layer", -1))

    def feature_blocks(self) -> int:
        """How many blocks feed the projector: the hidden state the config selects (0 = embeddings)."""
        n, k = self.vision_config.get("num_hidden_layers", 24), self.feature_layer()
        blocks = (k if k >= 0 else n + 1 + k) if isinstance(k, int) else -1
        if not 0 < blocks <= n:
            raise UnsupportedModelError(f"{self.ckpt.path}: vision_feature_layer {k} cannot be expressed for llama.cpp")
        return blocks

    def scale_factor(self) -> int:
        ratio = self.config.get("downsample_ratio", 0.5)
        side = self.square("image_size", 448) // self.square("patch_size", 14)
        scale = round(1 / ratio) if isinstance(ratio, (int, float)) and 0 < ratio <= 1 else 0
        if not scale or abs(scale * ratio - 1) > 1e-6 or side % scale:
            raise UnsupportedModelError(
                f"{self.ckpt.path}: downsample_ratio={ratio} cannot pixel-shuffle a {side}x{side} patch grid")
        return scale

    def text_width(self) -> int:
        width = (self.config.get("text_config") or self.config.get("llm_config") or {}).get("hidden_size")
        if width is None:
            raise InputError(f"{self.ckpt.path}: config.json gives no text hidden_size (text_config or llm_config)")
        return width

    def tiles(self) -> dict:
        """The tile counts llama.cpp may cut an image into (it assumes 1 to 12 when not told)."""
        pre = self.ckpt.preprocessor_config
        low = self.config.get("min_dynamic_patch", pre.get("min_patches"))
        high = self.config.get("max_dynamic_patch", pre.get("max_patches"))
        return {key: n for key, n in ((K.PREPROC_MIN_TILES, low), (K.PREPROC_MAX_TILES, high))
                if isinstance(n, int) and 0 < n < 1 << 12}

    def params(self) -> VisionParams:
        v = self.vision_config  # missing keys take InternVLVisionConfig's defaults, as transformers does
        mean, std = preprocessing(self.ckpt, IMAGENET_MEAN, IMAGENET_STD)
        return VisionParams(
            image_size=self.square("image_size", 448), patch_size=self.square("patch_size", 14),
            embedding_length=v.get("hidden_size", 1024), feed_forward_length=v.get("intermediate_size", 4096),
            block_count=self.feature_blocks(), head_count=v.get("num_attention_heads", 16),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6), projection_dim=self.text_width(),
            image_mean=mean, image_std=std, **ACTIVATIONS[v.get("hidden_act", "gelu")],
            extra={K.Projector.SCALE_FACTOR: self.scale_factor(), **self.tiles()},
        )

    def skip(self, canonical):
        if block := BLOCK.search(canonical):
            return int(block[1]) >= self.params().block_count
        if canonical.startswith(TOWER + "layernorm."):  # transformers applies it to the last hidden state only
            return self.feature_layer() != -1
        return canonical == TOWER + "embeddings.mask_token"  # masked image modelling only

    def rename(self, canonical):
        if canonical.startswith(PROJECTOR):  # LayerNorm, Linear, (GELU), Linear: nothing else is run
            m = MLP.fullmatch(canonical)
            return m and f"{gguf.TENSOR_NAMES[T.V_MMPROJ_MLP].format(bid=m['index'])}.{m['kind']}"
        if m := QKV.fullmatch(canonical):
            return f"{gguf.TENSOR_NAMES[T.V_ENC_ATTN_QKV].format(bid=m['bid'])}.{m['kind']}"
        if canonical.startswith(TOWER + "layernorm."):
            return gguf.TENSOR_NAMES[T.V_POST_NORM] + canonical[len(TOWER + "layernorm"):]
        name = super().rename(canonical)
        if name is not None and not name.endswith((".weight", ".bias")) and name not in SUFFIXLESS:
            name += ".weight"  # bare parameters: llama.cpp reads ls1, ls2 and the position embedding as .weight
        return name

    def modify(self, gguf_name, tensor):
        if gguf_name == POSITIONS:  # stored in the runtime's order: patches first, CLS's row last
            yield gguf_name, tensor[..., np.r_[1:tensor.shape[-2], 0], :]
        elif m := QKV_SPLIT.fullmatch(gguf_name):
            n = tensor.shape[0] // 3
            for i, part in enumerate((T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V)):
                yield f"{gguf.TENSOR_NAMES[part].format(bid=m['bid'])}.{m['kind']}", tensor[i * n:(i + 1) * n]
        else:
            yield gguf_name, tensor

    def tensors(self):
        """In name order, so every layout writes its tensors in the same order."""
        return iter(sorted(super().tensors(), key=lambda item: item[0]))
