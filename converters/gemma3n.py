"""Gemma 3n (timm's MobileNet-V5 encoder, multi-scale fusion adapter, soft-token embedder)
-> projector ``gemma3nv`` (llama.cpp tools/mtmd/models/mobilenetv5.cpp).

What is special here:
- the tower's blocks are indexed twice (stage, block): ``timm_model.blocks.S.I.<suffix>`` is
  clip-impl.h's ``v.blk.S.I.<suffix>`` (TN_MNV5_*, which keep timm's suffixes); gguf-py has no
  table for doubly indexed blocks, so ``BLOCK_TENSORS`` lists the suffixes llama.cpp loads.  The
  stem, the fusion adapter and the embedder go through gguf-py's ``TensorNameMap``.
- ``layer_scale.gamma`` and the stem's bias multiply / add channel-wise on [W, H, C] maps, so
  they are written as (1, C, 1, 1).
- Gemma 3n's RMSNorms scale by ``weight`` (not ``1 + weight``): stored as saved.
- the embedder's hard-token table (``embedding``, ``hard_embedding_norm``) embeds vision token
  ids on the text side; llama.cpp's graph never reads it, so it is left out.  The audio tower
  and its embedder lie outside the vision prefixes and are not converted.
- the released preprocessors say ``do_normalize: false`` beside mean/std 0.5: pixels are only
  rescaled to [0, 1], so mean 0 / std 1 are written (any normalisation that is on is honoured).

What the runtime fixes, and is therefore refused otherwise (mobilenetv5.cpp, clip.cpp):
16x16 output tokens (``n_patches = image_size / patch_size``, so patch_size is written as
image_size / 256), fusion of the ends of stages 2 and 3 of exactly four stages, stride 2 at a
stage's first block only, 3x3 edge-residual kernels, RMS eps 1e-6 in the embedder, and the
projected width read from ``mm.input_projection``'s *input* side (clip.cpp
``clip_n_mmproj_embd``: ``ne[0]``), so the text width must equal the vision width (2048, as in
every released Gemma 3n); the fix upstream is to return ``ne[1]`` for gemma3nv.
"""
from __future__ import annotations

import re

import gguf

from ggraft.errors import UnsupportedModelError
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention

TOWER, EMBEDDER = "model.vision_tower.timm_model.", "model.embed_vision."
ENCODER = "mobilenetv5_300m_enc"  # the timm architecture transformers builds for Gemma 3n
BLOCK = re.compile(re.escape(TOWER) + r"blocks\.(\d+)\.(\d+)\.(.+)$")
#: what llama.cpp loads of a block (clip-impl.h TN_MNV5_BLK_* / TN_MNV5_ATTN_*, "v.blk.%d.%d.<suffix>")
BLOCK_TENSORS = frozenset((
    "conv_exp.weight", "bn1.weight", "conv_pwl.weight", "bn2.weight",  # edge residual
    "dw_start.conv.weight", "dw_start.bn.weight", "pw_exp.conv.weight", "pw_exp.bn.weight",  # inverted residual
    "dw_mid.conv.weight", "dw_mid.bn.weight", "pw_proj.conv.weight", "pw_proj.bn.weight", "layer_scale.gamma",
    "norm.weight", "attn.query.proj.weight", "attn.key.proj.weight", "attn.value.proj.weight",  # attention
    "attn.output.proj.weight", "attn.key.down_conv.weight", "attn.key.norm.weight", "attn.value.down_conv.weight",
    "attn.value.norm.weight"))
CHANNELWISE = ("layer_scale.gamma", gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_CONV_STEM] + ".bias")
TOKENS_PER_SIDE = 16  # mobilenetv5.cpp: target_out_res
FUSED_STRIDE = 16  # pixels per cell of the fused map: the stem and stages 0-2 each stride 2
#: timm model_args that leave the graph as llama.cpp builds it (block_args is checked block by block)
PLAIN_MODEL_ARGS = {"block_args", "stem_size", "fix_stem", "stem_bias", "channel_multiplier",
                    "layer_scale_init_value", "drop_rate", "drop_path_rate", "msfa_output_resolution"}
BLOCK_KEYS = {"block_type", "out_chs", "stride", "act_layer", "noskip", "se_ratio", "exp_ratio", "force_in_chs",
              "exp_kernel_size", "pw_kernel_size", "dw_kernel_size_start", "dw_kernel_size_mid", "dw_kernel_size_end",
              "dw_kernel_size", "num_heads", "key_dim", "value_dim", "kv_stride"}
PLAIN_BLOCK = {"noskip": False, "se_ratio": 0, "act_layer": None, "dw_kernel_size_end": 0}  # no llama.cpp equivalent


def block_problem(stages: list) -> str | None:
    """Why llama.cpp's MobileNet-V5 graph cannot run a custom timm ``block_args`` (None: it can)."""
    if len(stages) != 4:
        return f"model_args.block_args has {len(stages)} stages; llama.cpp fuses the ends of stages 2 and 3 of four"
    for s, stage in enumerate(stages):
        for i, b in enumerate(stage):
            kind, at = b.get("block_type"), f"model_args.block_args[{s}][{i}]"
            odd = sorted(set(b) - BLOCK_KEYS) + [k for k, plain in PLAIN_BLOCK.items() if b.get(k, plain) != plain]
            if kind not in ("er", "uir", "mqa"):
                return f"{at}: block type {kind!r} has no llama.cpp equivalent (it runs er, uir and mqa)"
            if odd or b.get("kv_stride", 1) not in (1, 2):
                return f"{at}: {kind} block with {(odd or ['kv_stride'])[0]} has no llama.cpp equivalent"
            if b.get("stride", 1) != (2 if i == 0 else 1) or (kind == "mqa" and i == 0):
                return f"{at}: llama.cpp strides 2 in the first block of each stage (not attention) and 1 elsewhere"
            if kind == "er" and (b.get("exp_kernel_size"), b.get("pw_kernel_size", 1)) != (3, 1):
                return f"{at}: llama.cpp's edge-residual block is a 3x3 then a 1x1 convolution"
            if kind == "uir" and i == 0 and not b.get("dw_kernel_size_mid"):
                return f"{at}: a stage's first block strides in dw_start, which llama.cpp never strides"
            if kind == "mqa" and (b.get("out_chs") != stage[i - 1].get("out_chs")
                                  or b.get("key_dim") != b.get("value_dim")):
                return f"{at}: llama.cpp's attention block needs key_dim == value_dim and unchanged channels"
    return None


@register
class Gemma3n(Converter):
    architectures = ("Gemma3nForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.GEMMA3NV
    family = "Gemma 3n"
    image_tokens = ("<start_of_image>", "<image_soft_token>", "<end_of_image>")
    convention = Convention("Gemma 3", ("<start_of_image>", "<end_of_image>", "<image_soft_token>"))  # as Gemma 3's
    vision_prefixes = (TOWER, EMBEDDER)
    layout_aliases = (("vision_tower.timm_model.", TOWER), ("embed_vision.", EMBEDDER))  # saves of Gemma3nModel

    @classmethod
    def refuses(cls, config):
        v, text = config.get("vision_config") or {}, config.get("text_config") or {}
        if v.get("architecture", ENCODER) != ENCODER:
            return f"vision tower {v.get('architecture')!r} is not timm's {ENCODER} (what llama.cpp's gemma3nv runs)"
        if v.get("rms_norm_eps", 1e-6) != 1e-6:
            return f"vision rms_norm_eps {v['rms_norm_eps']} differs from the 1e-6 llama.cpp's embedder uses"
        if config.get("vision_soft_tokens_per_image", 256) != TOKENS_PER_SIDE ** 2:
            return f"vision_soft_tokens_per_image {config['vision_soft_tokens_per_image']}: llama.cpp emits 256"
        if text.get("hidden_size", 2048) != v.get("hidden_size", 2048):
            return (f"text hidden_size {text.get('hidden_size')} differs from the vision hidden_size "
                    f"{v.get('hidden_size', 2048)}: llama.cpp's gemma3nv takes its output width from the projection's "
                    "input side (clip.cpp clip_n_mmproj_embd)")
        args = v.get("model_args") or {}
        odd = sorted(k for k in args if k not in PLAIN_MODEL_ARGS)
        if odd:
            return f"vision model_args {odd[0]!r} has no llama.cpp equivalent"
        return block_problem(args["block_args"]) if "block_args" in args else None

    def image_size(self) -> int:
        size = self.ckpt.preprocessor_config.get("size") or {"height": 768, "width": 768}
        side = size.get("height"), size.get("width")
        if side[0] != side[1] or not isinstance(side[0], int) or side[0] % (FUSED_STRIDE * TOKENS_PER_SIDE):
            raise UnsupportedModelError(f"{self.ckpt.path}: image size {side[0]}x{side[1]}: llama.cpp's gemma3nv "
                                        f"needs a square side that is a multiple of {FUSED_STRIDE * TOKENS_PER_SIDE}")
        return side[0]

    def blocks(self) -> set[tuple[int, int]]:
        """(stage, block) of every MobileNet block the checkpoint holds."""
        found = (BLOCK.match(self.canonical(n)) for n in self.ckpt.names())
        blocks = {(int(m[1]), int(m[2])) for m in found if m}
        if {s for s, _ in blocks} != {0, 1, 2, 3}:
            raise UnsupportedModelError(f"{self.ckpt.path}: the MobileNet has stages {sorted({s for s, _ in blocks})}; "
                                        "llama.cpp's gemma3nv runs exactly stages 0-3")
        return blocks

    def params(self) -> VisionParams:
        v, pre = self.vision_config, self.ckpt.preprocessor_config
        if pre.get("do_normalize", True):
            mean, std = preprocessing(self.ckpt, [0.5] * 3, [0.5] * 3)
        else:  # only rescaled to [0, 1]
            mean, std = [0.0] * 3, [1.0] * 3
        size = self.image_size()
        return VisionParams(  # head_count / feed_forward_length are required keys the graph does not read
            image_size=size, patch_size=size // TOKENS_PER_SIDE ** 2, embedding_length=v.get("hidden_size", 2048),
            feed_forward_length=0, block_count=len(self.blocks()), head_count=1,
            layer_norm_eps=v.get("rms_norm_eps", 1e-6), projection_dim=self.text_config.get("hidden_size", 2048),
            image_mean=mean, image_std=std, use_gelu=True)

    def skip(self, canonical):
        return canonical.startswith((EMBEDDER + "embedding.", EMBEDDER + "hard_embedding_norm."))

    def rename(self, canonical):
        block = BLOCK.match(canonical)
        if block is None:
            return super().rename(canonical)
        return f"v.blk.{block[1]}.{block[2]}.{block[3]}" if block[3] in BLOCK_TENSORS else None

    def modify(self, gguf_name, tensor):
        if gguf_name.endswith(CHANNELWISE):
            tensor = tensor.reshape(1, -1, 1, 1)
        yield gguf_name, tensor

    def test_image_size(self):
        return self.image_size(), self.image_size()
