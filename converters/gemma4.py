"""Gemma 4 -> projector ``gemma4v``; Gemma 4 unified (encoder-free) -> ``gemma4uv``.

What is special here:
- the processors patchify (``(row, col, channel)`` per patch) without normalizing; the model
  maps [0, 1] to [-1, 1] itself, as llama.cpp's graphs do after the file's mean/std, so mean 0 /
  std 1 are written unless the preprocessor normalizes.
- gemma4v: the patch Linear becomes llama.cpp's conv kernel (channel, row, col); every tower
  linear is a ``Gemma4ClippableLinear`` (``.linear.weight`` + scalar ``input_min``... bounds,
  written as the one-element f32 tensors clip.cpp clamps with); RMSNorms scale by ``weight``.
  Written because clip.cpp assumes otherwise: ``use_gelu`` (else GELU-quick: llama.cpp's own
  converter omits it, its 0.9996-0.99999 on tiny models), the pooling kernel as
  ``projector.scale_factor`` (else 3), head_dim and KV heads (else hidden / heads; clip-impl.h
  keys gguf-py 0.19 lacks) and ``rms_norm_eps``.  Rope theta is fixed at 100 in clip.cpp.
- gemma4uv: LayerNorm over merged-patch pixels, Linear, LayerNorm, factorized positions,
  LayerNorm.  llama.cpp feeds pixels in im2col's (channel, row, col) order, so the first norm
  and the Linear's columns are permuted to it, and reads the table as (axis, size, width).
  gguf-py 0.19 has neither the projector nor ``v.patch_norm.N`` (clip-impl.h's names).
- audio towers (``model.audio_tower.*``, ``model.embed_audio.*``) are outside the vision
  prefixes and left out, like the language model.

Layouts: Gemma 4 postdates transformers 4.x; the hub holds what transformers 5 saves
(``model.vision_tower.*``, ``model.embed_vision.*``; unified ``model.vision_embedder.*``), also
taken: a bare ``Gemma4Model``'s names (no ``model.``) and unified's module names
(``model.embed_vision.patch_ln1``, ``...multimodal_embedder.embedding_projection``).
"""
from __future__ import annotations

import gguf
import numpy as np

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention

from ._image_norms import GELU_ACTS

T, NAMES = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
TOWER, EMBED, UNIFIED = "model.vision_tower.", "model.embed_vision.", "model.vision_embedder."
ENCODER = "vision_model.model."  # TensorNameMap's names for Gemma 4's encoder layers
PATCH, POSITIONS = NAMES[T.V_ENC_EMBD_PATCH], NAMES[T.V_ENC_EMBD_POS]
PATCH_NORM = "v.patch_norm.{}"  # clip-impl.h TN_PATCH_NORM
HEAD_DIM_KEY, HEAD_COUNT_KV_KEY = "clip.vision.attention.head_dim", "clip.vision.attention.head_count_kv"
CLAMPS = (".input_min", ".input_max", ".output_min", ".output_max")
LLAMA_ROPE_THETA = 100.0  # clip.cpp: gemma4v's rope theta (it reads no key for it)
DYNAMIC_IMAGE_SIZE = 224  # clip.vision.image_size: unused by llama.cpp's dynamic-size gemma4 input (its own value)
CONVENTION = Convention("Gemma 4", ("<|image>", "<image|>", "<|image|>"))


def image_normalization(ckpt) -> tuple[list[float], list[float]]:
    """Gemma 4's processors only rescale to [0, 1] unless do_normalize is set."""
    if not ckpt.preprocessor_config.get("do_normalize", False):
        return [0.0] * 3, [1.0] * 3
    return preprocessing(ckpt, [0.0] * 3, [1.0] * 3)


def patches(pixel_values, size: int):
    """Pixels (1, 3, H, W) as Gemma 4's processors give them to the model: (1, n, size^2 * 3)
    patches in raster order and their (1, n, 2) (x, y) grid positions."""
    import torch
    from transformers.models.gemma4.image_processing_pil_gemma4 import convert_image_to_patches

    h, w = pixel_values.shape[2] // size, pixel_values.shape[3] // size
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    flat = torch.from_numpy(convert_image_to_patches(pixel_values[0].numpy(), size))
    return flat[None], torch.stack([xs, ys], -1).reshape(1, -1, 2)


class _Gemma4Base(Converter):
    image_tokens = ("<|image>", "<|image|>", "<image|>")
    convention = CONVENTION

    def kernel(self) -> int:
        return self.vision_config.get("pooling_kernel_size", 3)

    def model_patch(self) -> int:
        """Side of the pixel patch the model takes as one input row."""
        return self.vision_config.get("patch_size", 16)

    def vision_params(self, extra: dict, **widths) -> VisionParams:
        """What both share; missing keys take transformers' config defaults, as transformers does."""
        v = self.vision_config
        mean, std = image_normalization(self.ckpt)
        return VisionParams(image_size=DYNAMIC_IMAGE_SIZE, patch_size=v.get("patch_size", 16),
                            layer_norm_eps=v.get("rms_norm_eps", 1e-6), image_mean=mean, image_std=std,
                            projection_dim=self.text_config.get("hidden_size", 2304),
                            extra={gguf.Keys.ClipVision.Projector.SCALE_FACTOR: self.kernel(), **extra}, **widths)

    def test_image_size(self):
        side = self.vision_config.get("patch_size", 16) * self.kernel()  # llama.cpp aligns sides to this
        return 8 * side, 9 * side  # 72 soft tokens: llama.cpp takes 70..1120 without resizing

    def model_inputs(self, pixel_values):
        flat, positions = patches(pixel_values, self.model_patch())
        return {"pixel_values": flat, "image_position_ids": positions}


@register
class Gemma4(_Gemma4Base):
    architectures = ("Gemma4ForConditionalGeneration",)
    projector_type = gguf.VisionProjectorType.GEMMA4V
    family = "Gemma 4"
    vision_prefixes = (ENCODER, TOWER, EMBED)
    layout_aliases = ((TOWER + "encoder.", ENCODER), ("vision_tower.encoder.", ENCODER),
                      ("vision_tower.", TOWER), ("embed_vision.", EMBED))

    @classmethod
    def refuses(cls, config):
        if not (v := config.get("vision_config")):
            return "the checkpoint has no vision tower (vision_config is null)"
        theta = (v.get("rope_parameters") or {}).get("rope_theta", LLAMA_ROPE_THETA)
        if theta != LLAMA_ROPE_THETA:
            return f"vision rope_theta {theta} (llama.cpp's gemma4v graph uses {LLAMA_ROPE_THETA:g})"
        if (act := v.get("hidden_activation", "gelu_pytorch_tanh")) not in GELU_ACTS:
            return f"vision activation {act!r} has no llama.cpp equivalent"
        return None

    def params(self) -> VisionParams:
        v = self.vision_config
        return self.vision_params(
            {HEAD_DIM_KEY: v.get("head_dim", 64), HEAD_COUNT_KV_KEY: v.get("num_key_value_heads", 12)},
            embedding_length=v.get("hidden_size", 768), feed_forward_length=v.get("intermediate_size", 3072),
            block_count=v.get("num_hidden_layers", 16), head_count=v.get("num_attention_heads", 12), use_gelu=True)

    def rename(self, canonical):
        name = canonical.replace(".linear.weight", ".weight")  # Gemma4ClippableLinear wraps an nn.Linear
        if name.endswith(".position_embedding_table"):  # a bare parameter
            name += ".weight"
        return self.name_map.get_name(name, try_suffixes=(".weight", ".bias", *CLAMPS))

    def modify(self, gguf_name, tensor):
        if gguf_name == PATCH + ".weight":  # Linear over (row, col, channel) -> kernel (out, channel, row, col)
            p = self.model_patch()
            tensor = tensor.reshape(tensor.shape[0], p, p, 3).transpose(0, 3, 1, 2)
        elif gguf_name.endswith(CLAMPS):
            tensor = tensor.reshape(1)  # a scalar buffer -> the one-element f32 tensor clip.cpp reads
        yield gguf_name, tensor


@register
class Gemma4Unified(_Gemma4Base):
    architectures = ("Gemma4UnifiedForConditionalGeneration",)
    projector_type = "gemma4uv"  # clip-impl.h PROJECTOR_TYPE_GEMMA4UV
    family = "Gemma 4 unified"
    vision_prefixes = (UNIFIED, EMBED)
    layout_aliases = ((EMBED + "multimodal_embedder.", EMBED), (EMBED + "patch_", UNIFIED + "patch_"),
                      (EMBED + "pos_", UNIFIED + "pos_"))
    modules = {UNIFIED + "patch_ln1": PATCH_NORM.format(1), UNIFIED + "patch_dense": PATCH,
               UNIFIED + "patch_ln2": PATCH_NORM.format(2), UNIFIED + "pos_norm": PATCH_NORM.format(3),
               EMBED + "embedding_projection": NAMES[T.V_MM_INP_PROJ]}

    @classmethod
    def refuses(cls, config):
        if not (v := config.get("vision_config")):
            return "the checkpoint has no vision embedder (vision_config is null)"
        embd, out = v.get("mm_embed_dim", 3840), v.get("output_proj_dims", 3840)
        if embd != out:
            return f"mm_embed_dim {embd} differs from output_proj_dims {out}: the projection cannot take the patches"
        return None

    def model_patch(self):
        return super().model_patch() * self.kernel()

    def params(self) -> VisionParams:
        # no attention: llama.cpp's converter writes 0 heads, which clip.cpp accepts, but ggraft's
        # requirement check (mmproj/requirements.py) refuses 0, so one
        return self.vision_params({}, embedding_length=self.vision_config.get("mm_embed_dim", 3840),
                                  feed_forward_length=0, block_count=0, head_count=1)

    def rename(self, canonical):
        if canonical == UNIFIED + "pos_embedding":  # a bare parameter
            return POSITIONS + ".weight"
        module, _, kind = canonical.rpartition(".")
        return f"{self.modules[module]}.{kind}" if module in self.modules and kind in ("weight", "bias") else None

    def modify(self, gguf_name, tensor):
        p = self.model_patch()
        to_im2col = np.arange(p * p * 3).reshape(p, p, 3).transpose(2, 0, 1).reshape(-1)  # (row, col, ch) -> (ch, ...)
        if gguf_name == PATCH + ".weight":
            tensor = tensor[:, to_im2col]
        elif gguf_name.startswith(PATCH_NORM.format(1) + "."):
            tensor = tensor[to_im2col]
        elif gguf_name == POSITIONS + ".weight":
            tensor = tensor.transpose(1, 0, 2)  # (size, axis, width) -> (axis, size, width)
        yield gguf_name, tensor
