"""Llama 4 (Scout, Maverick) vision tower -> projector ``llama4``.

What is special here:
- the patch embedding is a linear layer over unfolded patches (channel, row, column), stored 2-D;
  llama.cpp takes exactly that layout (it only borrows the 4-D shape for im2col).
- CLS is appended *after* the patches and gets rope position 0 and the last learned position
  row, in transformers and in llama.cpp alike.  ``positional_embedding_vlm`` is a bare parameter
  that llama.cpp looks up as ``v.position_embd.weight``.
- 2D rope on interleaved pairs, x on the first half of each head and y on the second: the same
  in both, so q/k pass unpermuted; llama.cpp fixes the rope base at 10000 (other bases refused).
- a block's ``post_attention_layernorm`` is its pre-FFN norm, llama.cpp's ``ln2``.  gguf-py's
  TensorNameMap lists that name twice, for ``ln2`` (llama4) and for ``attn_post_norm`` (gemma4),
  and the later row wins: a file named by the table alone (llama.cpp's own converter) gets a norm
  on the attention output and none before the FFN.  It is named here.
- the adapter (pixel shuffle by ``1/pixel_shuffle_ratio``, then ``fc1``/``fc2`` with GELU after
  each) is ``mm.model.mlp.1``/``mm.model.mlp.2`` (named here: TensorNameMap's ``fc{bid}`` row only
  reaches bid < the vision block count), and ``multi_modal_projector.linear_1`` is ``mm.model.fc``.
- transformers builds every LayerNorm with PyTorch's default eps (1e-5) and every GELU exact,
  whatever ``norm_eps``/``hidden_act`` say; the file records 1e-5 (llama.cpp's GELU is the tanh
  form: 0.9999997 per token on the tiny fixture).

llama.cpp's runtime (llama-cpp-python 0.3.36 included) departs from transformers in one way no
file can compensate: its pixel shuffle (``tools/mtmd/models/llama4.cpp`` lines 57-76) leaves out
the second permute (commented out at line 71), so the image tokens come out column-major (token
``t`` is grid cell ``(t % n, t // n)``) where transformers emits them row-major.
``runtime_reference`` runs transformers' modules with that token order.
"""
from __future__ import annotations

import re

import gguf

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect

TOWER, PROJECTOR = "vision_model.", "multi_modal_projector."
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default: transformers' Llama 4 vision norms take no eps
LLAMA4_IMAGE_MEAN = LLAMA4_IMAGE_STD = [0.5, 0.5, 0.5]  # Llama4ImageProcessor's defaults
_ADAPTER = re.compile(re.escape(TOWER) + r"vision_adapter\.mlp\.fc([12])\.weight")
_FFN_NORM = re.compile(re.escape(TOWER) + r"model\.layers\.(\d+)\.post_attention_layernorm\.(weight|bias)")
_NAMED = {  # bare parameters and single layers TensorNameMap does not name for llama.cpp
    TOWER + "positional_embedding_vlm": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_POS] + ".weight",
    PROJECTOR + "linear_1.weight": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_FC] + ".weight",
}


@register
class Llama4(Converter):
    architectures = ("Llama4ForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.LLAMA4
    family = "Llama 4"
    image_tokens = ("<|image_start|>", "<|image|>", "<|patch|>", "<|image_end|>")
    convention = Convention("Llama 4", ("<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>",
                                        "<|tile_x_separator|>", "<|tile_y_separator|>"))
    runtime_defects = (RuntimeDefect(
        "llama4", "llama.cpp's llama4 pixel shuffle emits the image tokens column-major (transposed) where "
        "transformers emits them row-major", "tools/mtmd/models/llama4.cpp:71, the commented-out second permute",
        seen_up_to="0.3.36"),)
    vision_prefixes = (TOWER, PROJECTOR)
    layout_aliases = (
        ("model.vision_model.", TOWER),  # module-prefixed saves
        ("model.multi_modal_projector.", PROJECTOR),
    )

    @classmethod
    def refuses(cls, config):
        v = config.get("vision_config") or {}
        theta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", 10000.0))
        if float(theta) != 10000.0:
            return f"vision rope_theta {theta}: llama.cpp's llama4 graph fixes it at 10000"
        ratio = float(v.get("pixel_shuffle_ratio", 0.5))
        if ratio <= 0 or abs(round(1 / ratio) * ratio - 1) > 1e-6:
            return f"pixel_shuffle_ratio {ratio}: llama.cpp's llama4 graph shuffles by a whole factor"
        grid = v.get("image_size", 448) // v.get("patch_size", 14)
        if grid % round(1 / ratio):
            return f"a {grid}x{grid} patch grid does not shuffle by {round(1 / ratio)}"
        head_dim = v.get("hidden_size", 768) // v.get("num_attention_heads", 16)
        if head_dim % 4:
            return f"vision head size {head_dim}: the 2D rope needs a multiple of 4"
        return None

    def params(self) -> VisionParams:
        v = self.vision_config  # missing keys take Llama4VisionConfig's defaults, as transformers does
        mean, std = preprocessing(self.ckpt, LLAMA4_IMAGE_MEAN, LLAMA4_IMAGE_STD)
        return VisionParams(
            image_size=v.get("image_size", 448), patch_size=v.get("patch_size", 14),
            embedding_length=v.get("hidden_size", 768), feed_forward_length=v.get("intermediate_size", 5632),
            block_count=v.get("num_hidden_layers", 34), head_count=v.get("num_attention_heads", 16),
            layer_norm_eps=LAYER_NORM_EPS, projection_dim=self.text_config.get("hidden_size", 5120),
            image_mean=mean, image_std=std, use_gelu=True,
            extra={gguf.Keys.ClipVision.Projector.SCALE_FACTOR: self.shuffle_factor},
        )

    @property
    def shuffle_factor(self) -> int:
        return round(1 / float(self.vision_config.get("pixel_shuffle_ratio", 0.5)))

    def rename(self, canonical):
        if canonical in _NAMED:
            return _NAMED[canonical]
        m = _ADAPTER.fullmatch(canonical)
        if m:
            return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ_MLP].format(bid=m.group(1)) + ".weight"
        m = _FFN_NORM.fullmatch(canonical)  # TensorNameMap's gemma4 row makes this attn_post_norm
        if m:
            return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_POST_ATTN_NORM].format(bid=m.group(1)) + "." + m.group(2)
        if canonical.startswith((PROJECTOR, TOWER + "vision_adapter.")):
            return None  # transformers' adapter and projector have no biases (llama.cpp's none either)
        return super().rename(canonical)

    def reference_features(self, model, pixel_values):
        """The projected image tokens transformers feeds the language model (forward's own steps)."""
        tower = model.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        return model.multi_modal_projector(tower)

    def runtime_reference(self, model, pixel_values):
        """transformers' features in llama.cpp's token order: its pixel shuffle leaves out the second
        permute, so the shuffled grid is read column by column (the adapter works per token)."""
        features = self.reference_features(model, pixel_values)
        n = self.params().image_size // self.params().patch_size // self.shuffle_factor
        return features.reshape(-1, n, n, features.shape[-1]).transpose(1, 2).reshape(features.shape)
