"""Step-3.7 (``Step3p7ForConditionalGeneration``; Step3-VL-10B's ``StepVLForConditionalGeneration``,
remote code, untested) -> projector ``step3vl``.

Layouts: the hub's, which transformers' ``save_pretrained`` writes back (``vision_model.conv1``,
``transformer.resblocks.N.attn.in_proj_*`` fused, ``ls_N.gamma``, ``vit_downsamplerN``,
``vit_large_projector``), and transformers' module names (``model.vision_model.layers.N.self_attn.
q_proj`` ..., ``model.multi_modal_projector``) that a saved state dict holds.  All write one file.

What is special here:
- 2D rope: the hub stores q/k with each head's rotated pairs adjacent ``(2j, 2j+1)``, x on the first
  half of the head, y on the second, which is llama.cpp's ``build_rope_2d`` order; transformers
  loads them permuted to rotate-half order (``PermuteForRope``), so module-named q/k are permuted
  back here.  llama.cpp fixes the rope base at 10000.
- the learned position table (``image_size / patch_size`` per side) is resampled to other grids;
  layer scales ``lambda_1/2`` are ``ls1``/``ls2``; two 3x3 stride-2 convolutions (``mm.0``, ``mm.1``)
  then a bias-free linear (``mm.model.fc``): ``projector.scale_factor`` 4.  A patch grid that is not a
  multiple of 4 (the overview's, or the 504-pixel tiles' llama.cpp cuts: ``mtmd-image.h:228``) makes
  the convolutions round up where llama.cpp counts tokens rounding down: refused.
- ``intermediate_size`` is ``int(hidden_size * mlp_ratio)`` whatever the config says (transformers).

llama.cpp's runtime (llama-cpp-python 0.3.36) departs from transformers in two ways no file can
compensate: it resamples the position table for the 504-pixel tiles with antialiased bilinear
interpolation (``models/step3vl.cpp:19``, ``clip-graph.h:12``) where transformers uses plain bilinear,
which differs when a tile has fewer patches than the table (Step-3.7: 36 < 52); and its preprocessing
shrinks the overview with plain bilinear (``mtmd-image.cpp:1392``) where transformers' processor
antialiases, and pads a tile past a short side with black (``mtmd-image.cpp:1530``) where the
processor stretches it.  ``runtime_reference`` runs transformers with llama.cpp's position table.
"""
from __future__ import annotations

import re

import gguf

from ggraft.errors import UnsupportedModelError
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect

from ._image_norms import ACTIVATIONS, CLIP_MEAN, CLIP_STD

T, K = gguf.MODEL_TENSOR, gguf.Keys.ClipVision
HUB, MODULES = "vision_model.", "model.vision_model."
LLAMA_TILE = 504  # tools/mtmd/mtmd-image.h:228 default_image_crop_size (the processor's patch_size)
LLAMA_DOWNSAMPLE = 4  # two stride-2 convolutions (clip.cpp: n_merge = 4)
LLAMA_ROPE_THETA = 10000.0  # clip.cpp load_hparams, PROJECTOR_TYPE_STEP3VL
MAX_IMAGE_SIZE = 3024  # Step3p7ImageProcessor.max_image_size


def tn(tensor: gguf.MODEL_TENSOR, suffix: str = ".weight", bid: int | str | None = None) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=bid) + suffix


FC, POS = tn(T.V_MMPROJ_FC), tn(T.V_ENC_EMBD_POS)
NAMED = {  # what TensorNameMap does not name (or names without the suffix llama.cpp reads)
    HUB + "positional_embedding": POS, MODULES + "embeddings.position_embedding.weight": POS,
    MODULES + "embeddings.patch_embedding.weight": tn(T.V_ENC_EMBD_PATCH),
    "vit_large_projector.weight": FC, "model.multi_modal_projector.weight": FC,
    **{f"{prefix}{i + 1}.{kind}": tn(T.V_MMPROJ, f".{kind}", i) for i in (0, 1) for kind in ("weight", "bias")
       for prefix in (HUB + "vit_downsampler", MODULES + "downsampler")},
    **{f"{MODULES}pre_layernorm.{kind}": tn(T.V_PRE_NORM, f".{kind}") for kind in ("weight", "bias")},
}
BLOCK = re.compile(r"model\.vision_model\.layers\.(?P<bid>\d+)\.(?P<part>.+?)(?P<kind>\.weight|\.bias|)")
BLOCK_PARTS = {"layernorm_before": T.V_ENC_INPUT_NORM, "layernorm_after": T.V_ENC_POST_ATTN_NORM,
               "self_attn.q_proj": T.V_ENC_ATTN_Q, "self_attn.k_proj": T.V_ENC_ATTN_K,
               "self_attn.v_proj": T.V_ENC_ATTN_V, "self_attn.out_proj": T.V_ENC_ATTN_O,
               "mlp.fc1": T.V_ENC_FFN_UP, "mlp.fc2": T.V_ENC_FFN_DOWN,
               "lambda_1": T.V_LAYER_SCALE_1, "lambda_2": T.V_LAYER_SCALE_2}
HUB_BLOCK = re.compile(r"vision_model\.transformer\.resblocks\.(?P<bid>\d+)\.(?:attn\.in_proj_(?P<kind>weight|bias)"
                       r"|ls_(?P<ls>[12])\.gamma)")
FUSED = re.compile(r"v\.blk\.(?P<bid>\d+)\.attn_qkv(?P<kind>\.weight|\.bias)")
ROTATE_HALF = re.compile(r"v\.blk\.\d+\.attn_[qk]\.(weight|bias)")


def vision(config: dict) -> dict:
    """The vision config under transformers' names (the hub's remote-code keys mapped) and defaults."""
    v = dict(config.get("vision_config") or {})
    for hub, name in (("width", "hidden_size"), ("layers", "num_hidden_layers"), ("heads", "num_attention_heads")):
        if hub in v:
            v.setdefault(name, v[hub])
    return {"hidden_size": 1536, "num_hidden_layers": 47, "num_attention_heads": 16, "image_size": 728,
            "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "mlp_ratio": 8960 / 1536, **v}


@register
class Step3VL(Converter):
    architectures = ("Step3p7ForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.STEP3VL
    family = "Step-3.7"
    image_tokens = ("<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>", "<im_patch>")
    convention = Convention("Step3-VL", image_tokens)
    runtime_defects = (
        RuntimeDefect("step3vl", "llama.cpp resamples the position table for 504-pixel tiles with antialiased "
                      "bilinear interpolation where transformers uses plain bilinear: tiles with fewer patches "
                      "than the table get other position embeddings", "tools/mtmd/models/step3vl.cpp:19, "
                      "resize_position_embeddings() with clip-graph.h:12 DEFAULT_INTERPOLATION_MODE",
                      seen_up_to="0.3.36"),
        RuntimeDefect("step3vl", "llama.cpp shrinks the overview of an image larger than image_size without "
                      "antialiasing and pads a tile past a short side under 504 pixels with black, where "
                      "transformers' processor antialiases and stretches it", "tools/mtmd/mtmd-image.cpp:1392 "
                      "(img_u8_resize_bilinear_to_f32) and 1530 (crop_with_black_padding)", seen_up_to="0.3.36"),
    )
    vision_prefixes = (HUB, "vit_large_projector.", MODULES, "model.multi_modal_projector.")

    @classmethod
    def refuses(cls, config):
        v = vision(config)
        theta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", LLAMA_ROPE_THETA))
        patch, heads = v["patch_size"], v["num_attention_heads"]
        if not isinstance(patch, int) or patch <= 0:
            return f"vision patch_size {patch!r}"
        if float(theta) != LLAMA_ROPE_THETA:
            return f"vision rope_theta {theta}: llama.cpp's step3vl graph fixes it at {LLAMA_ROPE_THETA:g}"
        if v["hidden_act"] not in ACTIVATIONS:
            return f"vision activation {v['hidden_act']!r} has no llama.cpp equivalent"
        if heads > 0 and v["hidden_size"] // heads % 4:
            return f"vision head size {v['hidden_size'] // heads}: the 2D rope needs a multiple of 4"
        if config.get("projector_bias", False):
            return "projector_bias: llama.cpp's step3vl projector (mm.model.fc) has no bias"
        if config.get("understand_projector_stride", 2) != 2:
            return (f"understand_projector_stride {config['understand_projector_stride']}: llama.cpp's step3vl "
                    "graph downsamples with two stride-2 convolutions")
        for what, side in (("image_size", v["image_size"]), ("llama.cpp's 504-pixel tiles", LLAMA_TILE)):
            grid = side // patch
            if grid % LLAMA_DOWNSAMPLE:
                return (f"{what} {side} with patch_size {patch}: a {grid}x{grid} patch grid, which llama.cpp's "
                        f"step3vl graph cannot downsample by {LLAMA_DOWNSAMPLE} (it would count {grid // 4} "
                        f"tokens per side where the convolutions make {-(-grid // 4)})")
        return None

    def params(self) -> VisionParams:
        v, pre = vision(self.config), self.ckpt.preprocessor_config
        tile = pre.get("patch_size", LLAMA_TILE)
        if tile != LLAMA_TILE:
            raise UnsupportedModelError(f"{self.ckpt.path}: the image processor's patch_size {tile}: llama.cpp cuts "
                                        f"tiles of {LLAMA_TILE} pixels (tools/mtmd/mtmd-image.h:228)")
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # Step3p7ImageProcessor's defaults
        hidden = v["hidden_size"]
        return VisionParams(
            image_size=v["image_size"], patch_size=v["patch_size"], embedding_length=hidden,
            feed_forward_length=int(hidden * v["mlp_ratio"]), block_count=v["num_hidden_layers"],
            head_count=v["num_attention_heads"], layer_norm_eps=v["layer_norm_eps"],
            projection_dim=self.text_config.get("hidden_size", 4096), image_mean=mean, image_std=std,
            **ACTIVATIONS[v["hidden_act"]],
            extra={K.Projector.SCALE_FACTOR: LLAMA_DOWNSAMPLE,
                   K.PREPROC_IMAGE_SIZE: int(pre.get("max_image_size", MAX_IMAGE_SIZE))},
        )

    def rename(self, canonical):
        if canonical in NAMED:
            return NAMED[canonical]
        if m := HUB_BLOCK.fullmatch(canonical):
            if m["ls"]:
                return tn(T.V_LAYER_SCALE_1 if m["ls"] == "1" else T.V_LAYER_SCALE_2, bid=m["bid"])
            return tn(T.V_ENC_ATTN_QKV, f".{m['kind']}", m["bid"])
        if canonical.startswith(MODULES):
            m = BLOCK.fullmatch(canonical)
            part = BLOCK_PARTS.get(m["part"]) if m else None
            return part and tn(part, m["kind"] or ".weight", m["bid"])
        if canonical.startswith(HUB):
            return super().rename(canonical)
        return None  # a projector tensor llama.cpp has no place for (a bias)

    def modify(self, gguf_name, tensor):
        heads = self.params().head_count
        if m := FUSED.fullmatch(gguf_name):  # the hub's in_proj: q, k (already in llama.cpp's pair order), v
            n = tensor.shape[0] // 3
            for i, part in enumerate((T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V)):
                yield tn(part, m["kind"], m["bid"]), tensor[i * n:(i + 1) * n]
        elif ROTATE_HALF.fullmatch(gguf_name):  # module names: transformers' rotate-half order, permuted back
            shape = tensor.shape
            yield gguf_name, tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        else:
            yield gguf_name, tensor

    def tensors(self):
        """In name order, so every layout writes its tensors in the same order."""
        return iter(sorted(super().tensors(), key=lambda item: item[0]))

    def model_inputs(self, pixel_values):
        """The processor's global view alone: an image of the tower's own size gets no local tiles."""
        return {"pixel_values": pixel_values, "num_local_patches": [0] * pixel_values.shape[0]}

    def runtime_reference(self, model, pixel_values):
        """transformers with the position table resampled the way llama.cpp does (antialiased
        bilinear, ggml's filter); None where the two agree (a grid no smaller than the table)."""
        import torch.nn.functional as F

        p = self.params()
        n, (gh, gw) = p.image_size // p.patch_size, (side // p.patch_size for side in pixel_values.shape[2:])
        if gh >= n and gw >= n:
            return None

        def antialiased(module, args, output):  # swaps transformers' plain resampling for llama.cpp's
            table = module.position_embedding.weight.reshape(1, n, n, -1).permute(0, 3, 1, 2)
            resized = F.interpolate(table, size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)
            plain = module.interpolate_pos_encoding(output, gh * p.patch_size, gw * p.patch_size)
            return output - plain + resized.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)

        hook = model.model.vision_model.embeddings.register_forward_hook(antialiased)
        try:
            return self.reference_features(model, pixel_values)
        finally:
            hook.remove()


@register
class Step3VL10B(Step3VL):
    """Step3-VL-10B (remote code): the same vision tower in the same hub layout (llama.cpp's converter
    takes both architectures with one class, ``conversion/step3.py:18``), its config's remote-code keys
    (``width``/``layers``/``heads``, ``understand_projector_stride``) mapped.  Untested against a
    reference: transformers has no class for it."""

    architectures = ("StepVLForConditionalGeneration",)
    family = "Step3-VL-10B"
