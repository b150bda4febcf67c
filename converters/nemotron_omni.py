"""Nemotron 3 Nano Omni vision (C-RADIO tower, 2x2 pixel shuffle, RMSNorm + ReLU² MLP) -> ``nemotron_v2_vl``.

Layouts: transformers' ``save_pretrained``, which writes the hub's names (``vision_model.radio_model.model.*``
with a fused ``attn.qkv``, ``mlp1.0/1/3``, ``vision_projector.vision_final_layernorm``; TensorNameMap knows
most), and transformers' module names (``save_original_format=False``), rewritten to the hub's here.  Both
write q, k and v apart, in name order.  Audio is left out.

What is special here:
- llama.cpp adds the position rows as stored, one per patch of an ``image_size`` image (models/nemotron-v2-vl.cpp
  :13).  RADIO resamples its (max_img_size/patch)² table to the image's grid (bilinear, ``align_corners=False``);
  the file holds it resampled so, at the grid every square up to the processor's minimum budget gets (1024
  patches: 512 pixels for the release).  llama.cpp's converter resamples with ``align_corners=True``
  (conversion/nemotron.py:122): not what transformers computes.
- CLS and register rows go before the patches and are dropped after the tower, in both.  The tower's final
  LayerNorm (built when the text model has MTP layers) is ``v.post_ln``; llama.cpp's converter drops it.
- pixels are normalized by the image processor's mean/std (the hub's ``norm_mean``/``norm_std``, else CLIP's),
  not by the tower's ``input_conditioner``, which the model detaches.
- the projector's RMSNorm eps is 1e-6 in llama.cpp (nemotron-v2-vl.cpp:28), 1e-5 in transformers: a per-token
  scale, which cosine does not see.

llama.cpp resizes every image into one ``image_size`` square, letterboxed (mtmd.cpp:843-845, mtmd-image.cpp
756-762), where transformers' processor keeps the aspect ratio within its patch budget: only ``image_size``
squares get the same tokens, and no file can change that.  mtmd also writes no ``<img>``/``</img>`` around the
image, which the processor does.  Not handled: a checkpoint without layer scales whose ``layerscale_value`` is not 1.
"""
from __future__ import annotations

import math
import re

import gguf
import numpy as np

from ggraft.mmproj.converter import Converter, VisionParams, in_memory, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect

from ._image_norms import ACTIVATIONS, CLIP_MEAN, CLIP_STD

T, K, NAMES = gguf.MODEL_TENSOR, gguf.Keys.ClipVision, gguf.TENSOR_NAMES
TOWER, MLP, FINAL_NORM = "vision_model.radio_model.model.", "mlp1.", "vision_projector.vision_final_layernorm."
POSITIONS = NAMES[T.V_ENC_EMBD_POS] + ".weight"
#: transformers' module names (save_original_format=False) -> the hub's, which TensorNameMap knows
NATIVE = tuple((re.compile(a), b) for a, b in (
    (r"vision_model\.embeddings\.patch_projection\.", TOWER + "patch_generator.embedder."),
    (r"vision_model\.embeddings\.video_patch_projection\.", TOWER + "patch_generator.video_embedder."),
    (r"vision_model\.embeddings\.position_embedding$", TOWER + "patch_generator.pos_embed"),
    (r"vision_model\.embeddings\.cls_register_token$", TOWER + "patch_generator.cls_token.token"),
    (r"vision_model\.encoder\.layer\.(\d+)\.attention\.o_proj\.", TOWER + r"blocks.\1.attn.proj."),
    (r"vision_model\.encoder\.layer\.", TOWER + "blocks."),
    (r"vision_final_layernorm\.", FINAL_NORM),
    *((rf"multi_modal_projector\.{name}\.", f"{MLP}{i}.") for name, i in (("layer_norm", 0), ("linear_1", 1),
                                                                            ("linear_2", 3)))))
#: block parts TensorNameMap does not name: transformers' split q/k/v, layer scales, a SwiGLU FFN
BLOCK_PARTS = {"attention.q_proj": T.V_ENC_ATTN_Q, "attention.k_proj": T.V_ENC_ATTN_K,
               "attention.v_proj": T.V_ENC_ATTN_V, "layer_scale1.lambda1": T.V_LAYER_SCALE_1,
               "layer_scale2.lambda1": T.V_LAYER_SCALE_2, "mlp.gate_proj": T.V_ENC_FFN_GATE,
               "mlp.up_proj": T.V_ENC_FFN_UP, "mlp.down_proj": T.V_ENC_FFN_DOWN}
BLOCK = re.compile(re.escape(TOWER) + r"blocks\.(?P<bid>\d+)\.(?P<part>.+?)(?:\.(?P<kind>weight|bias))?")
QKV = re.compile(NAMES[T.V_ENC_ATTN_QKV].replace(".", r"\.").format(bid=r"(?P<bid>\d+)") + r"\.(?P<kind>\w+)")
#: RadioConfig's and the image processor's defaults
DEFAULTS = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, mlp_ratio=4.0, hidden_act="gelu",
                layer_norm_eps=1e-6, use_swiglu_ffn=False, patch_size=16, num_cls_tokens=3, num_registers=7)
MIN_PATCHES, MAX_PATCHES, MAX_MODEL_LEN = 1024, 13312, 16384  # the image processor's defaults


def _vision(config):
    v = config.get("vision_config") or {}
    return lambda key: v.get(key, DEFAULTS[key])


def patch_grid(height: int, width: int, patch: int, merge: int, low: int, high: int) -> tuple[int, int]:
    """transformers' processor's patch grid for an image (image_processing_nemotron_h_omni.get_patch_grid_size)."""
    gh, gw = round(height / patch + 0.5), round(width / patch + 0.5)
    f = min(math.sqrt(high / (gh * gw)), 1.0)
    gh, gw = math.floor(f * gh), math.floor(f * gw)
    if high > low and gh * gw < low:
        f = math.sqrt(low / (gh * gw))
        gh, gw = math.ceil(f * gh), math.ceil(f * gw)
    if r := gh % merge:
        gh = gh + merge - r if (gh + merge - r) * gw <= high else max(merge, gh - r)
    if r := gw % merge:
        gw = gw + merge - r if gh * (gw + merge - r) <= high else max(merge, gw - r)
    return gh, gw


def resample(table: np.ndarray, rows: int, side: int) -> np.ndarray:
    """A (rows*rows, E) position table at (side*side, E): PyTorch's bilinear, align_corners=False."""
    src = np.maximum((np.arange(side) + 0.5) * rows / side - 0.5, 0)
    i0 = np.minimum(np.floor(src).astype(int), rows - 1)
    i1, lam = np.minimum(i0 + 1, rows - 1), (src - i0)[:, None, None]
    grid = table.reshape(rows, rows, -1).astype(np.float64)
    grid = grid[i0] * (1 - lam) + grid[i1] * lam
    grid = grid[:, i0] * (1 - lam.transpose(1, 0, 2)) + grid[:, i1] * lam.transpose(1, 0, 2)
    return grid.reshape(side * side, -1).astype(np.float32)


@register
class NemotronOmni(Converter):
    architectures = ("NemotronH_Omni_Reasoning_V3",)
    projector_type = "nemotron_v2_vl"  # clip-impl.h PROJECTOR_TYPE_NEMOTRON_V2_VL
    family = "Nemotron 3 Nano Omni"
    image_tokens = ("<img>", "<image>", "</img>")
    convention = Convention("Nemotron VL", image_tokens)
    runtime_defects = (RuntimeDefect(
        "nemotron_v2_vl", "llama.cpp resizes every image into one image_size square (letterboxed) where transformers' "
        "processor keeps its aspect ratio within its patch budget: other images get other tokens",
        "tools/mtmd/mtmd.cpp:843-845 (fixed-size preprocessor, mtmd-image.cpp:756-762)", seen_up_to="0.3.36"),)
    vision_prefixes = (TOWER, MLP, FINAL_NORM)

    @classmethod
    def refuses(cls, config):
        v = _vision(config)
        if config.get("downsample_ratio", 0.5) != 0.5:
            return (f"downsample_ratio {config['downsample_ratio']}: transformers' model splits its features by 2x2 "
                    "merges (get_image_features), so nothing else can be proven")
        if not v("use_swiglu_ffn") and v("hidden_act") not in ACTIVATIONS:
            return f"vision activation {v('hidden_act')!r} has no llama.cpp equivalent"
        if v("num_cls_tokens") + v("num_registers") < 1:
            return "no CLS or register tokens (llama.cpp's nemotron_v2_vl graph prepends at least one)"
        if v("hidden_size") % v("num_attention_heads"):
            return f"vision hidden_size {v('hidden_size')} is not a multiple of {v('num_attention_heads')} heads"
        return None

    def canonical(self, name):
        for pattern, replacement in NATIVE:
            if pattern.match(name):
                return pattern.sub(replacement, name, count=1)
        return name

    @property
    def side(self) -> int:
        """Patches per side of llama.cpp's one image size: the grid the processor gives a one-patch square
        image, so every square up to it (the release: 32, 512 pixels)."""
        v, p = self.vision_config, _vision(self.config)("patch_size")  # the hub's remote code keeps the budget here
        pre = {**{k: v[k] for k in ("min_num_patches", "max_num_patches") if k in v}, **self.ckpt.preprocessor_config}
        low, high = pre.get("min_num_patches", MIN_PATCHES), pre.get("max_num_patches", MAX_PATCHES)
        budget = max((pre.get("max_model_len", MAX_MODEL_LEN) - 4) * 4, low)  # the processor's, for one image
        return patch_grid(p, p, p, 2, low, max(min(budget, high) if high else budget, low))[0]

    @property
    def text(self) -> dict:
        return self.text_config or self.config.get("llm_config") or {}  # the hub's legacy name

    @property
    def mtp(self) -> bool:
        """transformers builds the tower's final LayerNorm only when the text model has MTP layers."""
        return self.text.get("num_nextn_predict_layers", 0) > 0

    def params(self) -> VisionParams:
        v = _vision(self.config)
        pre = self.ckpt.preprocessor_config  # the hub's processor stores norm_mean / norm_std
        mean, std = preprocessing(self.ckpt, pre.get("norm_mean", CLIP_MEAN), pre.get("norm_std", CLIP_STD))
        width, ratio = v("hidden_size"), v("mlp_ratio")
        ffn = (int(int(width * ratio) * 2 / 3) + 7) // 8 * 8 if v("use_swiglu_ffn") else int(width * ratio)
        return VisionParams(
            image_size=self.side * v("patch_size"), patch_size=v("patch_size"), embedding_length=width,
            feed_forward_length=ffn, block_count=v("num_hidden_layers"), head_count=v("num_attention_heads"),
            layer_norm_eps=v("layer_norm_eps"), projection_dim=self.text.get("hidden_size", 4096), image_mean=mean,
            image_std=std, **({"use_silu": True} if v("use_swiglu_ffn") else ACTIVATIONS[v("hidden_act")]),
            extra={K.Projector.SCALE_FACTOR: 2})

    def skip(self, canonical):
        return ".video_embedder." in canonical or (canonical.startswith(FINAL_NORM) and not self.mtp)

    def rename(self, canonical):
        if canonical.startswith(MLP):
            m = re.fullmatch(r"mlp1\.([013])\.weight", canonical)  # TensorNameMap maps mlp1.N only below block_count
            return m and f"{NAMES[T.V_MMPROJ_MLP].format(bid=m[1])}.weight"
        if canonical.startswith(FINAL_NORM):
            return NAMES[T.V_POST_NORM] + canonical[len(FINAL_NORM) - 1:]
        if (m := BLOCK.fullmatch(canonical)) and m["part"] in BLOCK_PARTS:
            return f"{NAMES[BLOCK_PARTS[m['part']]].format(bid=m['bid'])}.{m['kind'] or 'weight'}"
        name = super().rename(canonical)
        return POSITIONS if name == NAMES[T.V_ENC_EMBD_POS] else name

    def modify(self, gguf_name, tensor):
        p = self.params()
        if gguf_name == POSITIONS:  # resampled to llama.cpp's one grid, as RADIO resamples it
            rows = math.isqrt(tensor.shape[-2])
            side = self.side
            shape = (np.float32, lambda s: (side * side, s[-1]))
            yield gguf_name, type(tensor)._wrap_fn(lambda t: resample(t, rows, side), meta_noop=shape)(tensor)
        elif gguf_name == NAMES[T.V_ENC_EMBD_PATCH] + ".weight":  # linear over (channel, row, column) patches
            yield gguf_name, tensor.reshape(-1, 3, p.patch_size, p.patch_size)
        elif m := QKV.fullmatch(gguf_name):  # q | k | v rows, written apart as transformers' layout has them
            n = tensor.shape[0] // 3
            for i, part in enumerate((T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V)):
                yield f"{NAMES[part].format(bid=m['bid'])}.{m['kind']}", tensor[i * n:(i + 1) * n]
        else:
            yield gguf_name, tensor

    def extra_tensors(self):
        """The final LayerNorm as transformers initializes it (ones, zeros) when the text model has MTP
        layers and the checkpoint holds none."""
        if self.mtp and not any(self.canonical(n).startswith(FINAL_NORM) for n in self.ckpt.names()):
            width = self.params().embedding_length
            yield NAMES[T.V_POST_NORM] + ".weight", in_memory(np.ones(width, np.float32))
            yield NAMES[T.V_POST_NORM] + ".bias", in_memory(np.zeros(width, np.float32))

    def tensors(self):
        """In name order, so every layout writes its tensors in the same order."""
        return iter(sorted(super().tensors(), key=lambda item: item[0]))

    def test_image_size(self):
        return self.params().image_size, self.params().image_size

    def model_inputs(self, pixel_values):
        """One image as the processor packs it: (patches, channel-major patch) rows and its grid."""
        import torch

        p, (n, c, h, w) = self.params().patch_size, pixel_values.shape
        patches = pixel_values.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * p * p)
        return {"pixel_values": patches, "image_grid_hw": torch.tensor([[h // p, w // p]])}
