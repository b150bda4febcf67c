"""Muse Glimmer -> projector ``muse-glimmer`` (llama.cpp: tools/mtmd/models/muse-glimmer.cpp).

What is special here:
- the bias-free linear patch embedding reads ``patch_temporal`` copies of each patch (frame, channel,
  row, column); a still image is every frame, so the frames' kernels are summed into one Conv2d kernel.
- a square learned position table resampled to the patch grid; blocks attend within windows of the
  table's side in patches, except every 4th block and the last.  llama.cpp fixes that pattern
  (models/muse-glimmer.cpp:49-52), takes the table's side as the window (clip.cpp:4638-4645) and rope
  base 10000 (clip.cpp:1705); other patterns, tables and bases are refused.
- 2D rope: rotate-half over the whole head in ``[w | h | w | h]`` quarters; llama.cpp ropes each half
  of the head on interleaved pairs (w, then h), so q and k rows are permuted per head.
- ``ln_post``, a 2x2 pixel shuffle, the adapter (fc1, GELU, fc2, GELU) and ``vision_projection``
  (``mm.0``/``mm.1``/``mm.2``); GELU is exact in both.  transformers' blocks norm with eps 1e-5 whatever
  ``layer_norm_eps`` says and llama.cpp has one eps: other values are refused.
- transformers ends with ``perception_emb_norm`` (RMS, no weight); llama.cpp's text graph RMS-normalizes
  every input embedding instead, the image's included (src/models/muse-glimmer.cpp:68-69), so verify
  compares llama.cpp's rows as that graph reads them (``llama_rows``).
Layouts: ``model.vision_tower.*`` etc. (the hub's) and the base ``MuseGlimmerModel``'s ``vision_tower.*``.

llama.cpp's runtime (llama-cpp-python 0.3.36 included) departs from transformers where no file can
help: it resamples the position table to the patch grid as an image with clamped edges (clip.cpp:312-333,
ggml-cpu/ops.cpp:8312-8338), where transformers (after the reference code) reads it resampled to a width
x height grid in raster order with zero padding (modeling_muse_glimmer.py:683-696).  They agree only on a
square grid no larger than the table (released model: 448x448 pixels or a smaller square);
``runtime_reference`` runs transformers with llama.cpp's position rows.  Its preprocessor caps images at
4096 merged tokens (clip.cpp:1709) whatever ``max_image_tokens`` says, and breaks a tie between grids of
the image's aspect ratio toward more tokens (mtmd-image.cpp:1781) where ``smart_resize`` takes the first.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect

T, NAMES = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
TOWER, ADAPTER, PROJECTION = "model.vision_tower.", "model.vision_adapter.", "model.vision_projection."
ROPE_THETA, SPARSE_FACTOR = 10000.0, 4  # clip.cpp:1705, 1707
MERGE = 2  # clip.cpp clip_n_output_tokens counts (nx / patch) / 2 by (ny / patch) / 2 tokens
BLOCK_EPS = 1e-5  # MuseGlimmerVisionEncoderLayer's nn.LayerNorm(eps=1e-5)
IMAGENET_STANDARD = [0.5, 0.5, 0.5]  # MuseGlimmerImageProcessor's mean and std
#: MuseGlimmerVisionConfig's defaults
DEFAULTS = dict(patch_size=14, pos_emb_height=32, pos_emb_width=32, num_attention_heads=16, num_hidden_layers=50,
                hidden_size=1536, intermediate_size=8960, hidden_act="gelu", patch_temporal=2, merge_size=2,
                layer_norm_eps=1e-5)
_TOP = {TOWER + "patch_embedder.patch_embedding": T.V_ENC_EMBD_PATCH,
        TOWER + "patch_embedder.position_embedding_table": T.V_ENC_EMBD_POS,
        TOWER + "ln_pre": T.V_PRE_NORM, TOWER + "ln_post": T.V_POST_NORM}
_MM = {ADAPTER + "fc1": 0, ADAPTER + "fc2": 1, PROJECTION.rstrip("."): 2}
_BLOCK = {"norm1": T.V_ENC_INPUT_NORM, "norm2": T.V_ENC_POST_ATTN_NORM, "attn.q_proj": T.V_ENC_ATTN_Q,
          "attn.k_proj": T.V_ENC_ATTN_K, "attn.v_proj": T.V_ENC_ATTN_V, "attn.proj": T.V_ENC_ATTN_O,
          "mlp.fc1": T.V_ENC_FFN_UP, "mlp.fc2": T.V_ENC_FFN_DOWN}
_BLOCK_RE = re.compile(re.escape(TOWER) + r"layers\.(\d+)\.(" + "|".join(map(re.escape, _BLOCK)) + r")\.(weight|bias)")
PATCH = NAMES[T.V_ENC_EMBD_PATCH] + ".weight"
QK = re.compile(r"v\.blk\.\d+\.attn_[qk]\.(weight|bias)")


def layer_types(n_layers: int) -> list[str]:
    """The one block pattern llama.cpp runs (models/muse-glimmer.cpp:49-52), transformers' default."""
    return ["full_attention" if (i + 1) % SPARSE_FACTOR == 0 or i == n_layers - 1 else "window_attention"
            for i in range(n_layers)]


def llama_rope_order(head_dim: int) -> list[int]:
    """For each of llama.cpp's channels of a head, transformers' channel: rotate-half pairs (k, k + d/2)
    become interleaved pairs (2k, 2k + 1); the first half of the head then holds the width axis."""
    half = head_dim // 2
    return [k + s * half for k in range(half) for s in (0, 1)]


@register
class MuseGlimmer(Converter):
    architectures = ("MuseGlimmerForConditionalGeneration", "MuseGlimmerModel")
    projector_type = "muse-glimmer"  # clip-impl.h PROJECTOR_TYPE_MUSE_GLIMMER; not in gguf-py 0.19
    family = "Muse Glimmer"
    image_tokens = ("<|image_start|>", "<|patch|>", "<|image_end|>")
    convention = Convention("Muse Glimmer", ("<|image_start|>", "<|image_end|>", "<|patch|>", "<|video|>",
                                             "<|vid_start|>", "<|vid_end|>", "<|vid_frame_separator|>"))
    runtime_defects = (RuntimeDefect(
        "muse-glimmer", "llama.cpp resamples muse-glimmer's position table to the patch grid as an image with "
        "clamped edges, where transformers reads it resampled to a width x height grid in raster order with zero "
        "padding: they agree only on square grids no larger than the table",
        "tools/mtmd/clip.cpp:312-333 (resize_position_embeddings)", seen_up_to="0.3.36"), RuntimeDefect(
        "muse-glimmer", "llama.cpp's muse-glimmer preprocessor breaks a tie between patch grids of the image's aspect "
        "ratio toward more tokens, where transformers' smart_resize takes the first (a 500x500 image: 18x18 tokens in "
        "llama.cpp, 17x17 in transformers)", "tools/mtmd/mtmd-image.cpp:1781", seen_up_to="0.3.36"))
    vision_prefixes = (TOWER, ADAPTER, PROJECTION)
    layout_aliases = tuple((p.removeprefix("model."), p) for p in vision_prefixes)  # MuseGlimmerModel's save

    @classmethod
    def refuses(cls, config):
        v = {**DEFAULTS, **(config.get("vision_config") or {})}
        rope = v.get("rope_parameters") or {}
        heads, width, n = v["num_attention_heads"], v["hidden_size"], v["num_hidden_layers"]
        if v["pos_emb_height"] != v["pos_emb_width"]:
            return (f"a {v['pos_emb_height']}x{v['pos_emb_width']} position table: llama.cpp's muse-glimmer graph "
                    "reads a square one")
        if v["merge_size"] != MERGE:
            return f"merge_size {v['merge_size']}: llama.cpp counts muse-glimmer image tokens as {MERGE}x{MERGE} merges"
        for where, act in (("vision", v["hidden_act"]), ("projector", config.get("projector_hidden_act", "gelu"))):
            if act != "gelu":
                return f"{where} activation {act!r}: llama.cpp's muse-glimmer graph runs exact GELU"
        theta = float(rope.get("rope_theta", v.get("rope_theta", ROPE_THETA)))
        if rope.get("rope_type", "axial") != "axial" or theta != ROPE_THETA:
            return f"vision rope {rope}: llama.cpp's muse-glimmer graph runs axial rope with base {ROPE_THETA:g}"
        if float(v["layer_norm_eps"]) != BLOCK_EPS:
            return (f"vision layer_norm_eps {v['layer_norm_eps']}: transformers' blocks norm with {BLOCK_EPS:g} "
                    "whatever it says and llama.cpp's muse-glimmer graph takes one eps")
        if heads <= 0 or width % heads or (width // heads) % 4:
            return f"vision hidden_size {width} over {heads} heads: the 2D rope needs a head width multiple of 4"
        if (v.get("layer_types") or layer_types(n)) != layer_types(n):
            return (f"vision layer_types {v['layer_types']}: llama.cpp's muse-glimmer graph attends globally in "
                    f"every {SPARSE_FACTOR}th block and the last only")
        return None

    @property
    def vision(self) -> dict:
        return {**DEFAULTS, **self.vision_config}

    def params(self) -> VisionParams:
        v = self.vision
        mean, std = preprocessing(self.ckpt, IMAGENET_STANDARD, IMAGENET_STANDARD)
        return VisionParams(
            image_size=v["pos_emb_height"] * v["patch_size"], patch_size=v["patch_size"],
            embedding_length=v["hidden_size"], feed_forward_length=v["intermediate_size"],
            block_count=v["num_hidden_layers"], head_count=v["num_attention_heads"], layer_norm_eps=BLOCK_EPS,
            projection_dim=self.text_config.get("hidden_size", 6656), image_mean=mean, image_std=std,
            use_gelu=True, extra={gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE: MERGE},
        )

    def rename(self, canonical):
        stem, _, kind = canonical.rpartition(".")
        if stem in _TOP:
            return f"{NAMES[_TOP[stem]]}.{kind}"
        if stem in _MM:
            return f"{NAMES[T.V_MMPROJ].format(bid=_MM[stem])}.{kind}"
        if m := _BLOCK_RE.fullmatch(canonical):
            return f"{NAMES[_BLOCK[m[2]]].format(bid=int(m[1]))}.{m[3]}"
        return None

    def modify(self, gguf_name, tensor):
        if gguf_name == PATCH:  # (embd, frames * 3 * p * p) -> one Conv2d kernel (embd, 3, p, p)
            p, frames = self.vision["patch_size"], self.vision["patch_temporal"]
            yield PATCH, tensor.astype(np.float32).reshape(tensor.shape[0], frames, 3, p, p).sum(axis=1)
        elif QK.fullmatch(gguf_name):
            heads = self.params().head_count
            dh = tensor.shape[0] // heads
            rows = tensor.reshape(heads, dh, *tensor.shape[1:])[:, llama_rope_order(dh)]
            yield gguf_name, rows.reshape(tensor.shape)
        else:
            yield gguf_name, tensor

    def test_image_size(self):
        """A grid taller and wider than the position table (so several windows, partial ones included)
        and not square, in merged units: llama.cpp's preprocessor leaves it as it is (clip.cpp 1709 cap)."""
        side, p = self.vision["pos_emb_height"], self.vision["patch_size"]
        rows, cols = (-(-(n + 1) // MERGE) * MERGE for n in (side, 2 * side))
        return rows * p, cols * p

    def model_inputs(self, pixel_values):
        """MuseGlimmerImageProcessor's layout of one image: patches in raster order, each
        (frame, channel, row, column) with the image as every frame, and its (1, rows, columns) grid."""
        import torch

        p, frames = self.vision["patch_size"], self.vision["patch_temporal"]
        gh, gw = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        x = pixel_values[0].reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).unsqueeze(2)
        x = x.expand(-1, -1, frames, -1, -1, -1).reshape(gh * gw, frames * 3 * p * p)
        return {"pixel_values": x.contiguous(), "image_grid_thw": torch.tensor([[1, gh, gw]])}

    @property
    def runtime_note(self):
        """``runtime_reference`` emulates the position rows (verify's images are never resized)."""
        first = self.runtime_defects[0]
        return f"{first.summary} ({first.reference})"

    def llama_rows(self, rows):
        """The image rows as llama.cpp's muse-glimmer text graph reads them: RMS-normalized without a
        weight (src/models/muse-glimmer.cpp:68-69), transformers' ``perception_emb_norm``."""
        eps = float(self.text_config.get("rms_norm_eps", 1e-5))
        x = rows.astype(np.float64)
        return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)).astype(np.float32)

    def runtime_reference(self, model, pixel_values):
        """transformers' features with llama.cpp's position rows: the table resampled to the patch grid
        as an image (patch row, patch column), bilinear with clamped edges."""
        import torch
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        inputs = self.model_inputs(pixel_values)
        indices, weights = get_vision_interpolation_indices_and_weights(
            inputs["image_grid_thw"], num_grid_per_side=self.vision["pos_emb_height"], mode="bilinear",
            align_corners=False, spatial_merge_size=1, padding="border")
        with torch.no_grad():
            return model.get_image_features(**inputs, interp_indices=indices, interp_weights=weights)
