"""MiniCPM-V 4.6 (SigLIP tower, window-attention ViT merger, DownsampleMLP merger) -> ``minicpmv4_6``.

What is special here:
- positions: transformers looks each patch up on the tower's own ``image_size / patch_size`` grid
  (nearest bucket); llama.cpp always on a 70x70 grid (``clip.cpp`` 4752-4759, the 980 / 14 of the
  released towers).  A grid of ``n`` with ``70 % n == 0`` is written as the 70x70 table whose row
  (a, b) is the checkpoint's row (a // k, b // k), ``k = 70 / n``: floor(floor(70 i / h) / k) is
  floor(n i / h), so every lookup lands on transformers' row.  Other grids are refused.
- ``16x`` (the default): blocks 0..``insert_layer_id``, then the ViT merger (attention within 2x2
  windows, a 2x2 merge MLP with a mean residual), the other blocks, ``post_layernorm`` and the
  final 2x2 merger (LayerNorm, Linear, exact GELU, Linear): ``projector.scale_factor`` 4 and
  ``wa_layer_indexes = [insert_layer_id]``, as llama.cpp reads them (``clip.cpp`` 1459-1478).
  ``4x`` skips the ViT merger: scale factor 2, and its tensors are left out.
- clip.cpp swaps a block's FFN up and down when ``ffn_down`` has the tower's width in ggml's
  first dimension (legacy files, ``clip.cpp`` 2335-2361), which is every file when the FFN is as
  wide as the tower: then ``fc1``/``fc2`` are written under each other's name for it to swap back.
- ``clip.vision.image_size`` is the processor's ``scale_resolution`` (the slice size llama.cpp
  slices by), not the tower's position-grid size.  The final merger's LayerNorm uses eps 1e-6 in
  transformers whatever the config says and llama.cpp runs one eps for all norms: other eps refused.
- gguf-py 0.19 names neither the projector type nor the ViT merger tensors nor this layout:
  the names are clip-impl.h's (``PROJECTOR_TYPE_MINICPMV4_6``, ``TN_VIT_MERGER_*``).
Layouts: ``model.vision_tower.*``/``model.merger.*`` (``MiniCPMV4_6ForConditionalGeneration``, the
hub) and ``vision_tower.*``/``merger.*`` (a saved bare ``MiniCPMV4_6Model``).

llama.cpp's preprocessing departs in 16x mode (``runtime_defects``): an image no larger than the
slice size is stretched to a square and an image of a smaller area but one longer side is sliced,
where transformers' processor keeps the aspect ratio and does not slice.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from ggraft.errors import UnsupportedModelError
from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect

from ._image_norms import ACTIVATIONS, SIGLIP_MEAN, SIGLIP_STD

T, NAMES, K = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES, gguf.Keys.ClipVision
TOWER, MERGER = "vision_tower.vision_model.", "merger.mlp.0."  # TensorNameMap's SigLIP names; the final merger
VIT_MERGER = TOWER + "vit_merger."
VIT_MERGER_NAMES = {  # clip-impl.h TN_VIT_MERGER_*
    "layer_norm1": "v.vit_merger.ln1", "self_attn.q_proj": "v.vit_merger.attn_q",
    "self_attn.k_proj": "v.vit_merger.attn_k", "self_attn.v_proj": "v.vit_merger.attn_v",
    "self_attn.out_proj": "v.vit_merger.attn_out", "pre_norm": "v.vit_merger.ds_ln",
    "linear_1": "v.vit_merger.ds_ffn_up", "linear_2": "v.vit_merger.ds_ffn_down"}
MERGER_NAMES = {"pre_norm": NAMES[T.V_MM_INP_NORM], "linear_1": NAMES[T.V_MM_UP], "linear_2": NAMES[T.V_MM_DOWN]}
POSITIONS = NAMES[T.V_ENC_EMBD_POS] + ".weight"
FFN = re.compile(r"v\.blk\.(?P<bid>\d+)\.ffn_(?P<part>up|down)\.(?P<kind>weight|bias)")
SWAPPED = {"up": T.V_ENC_FFN_DOWN, "down": T.V_ENC_FFN_UP}
LLAMA_GRID = 70  # clip.cpp's position grid side for minicpmv4_6
EPS = 1e-6  # transformers' MiniCPMV4_6DownsampleMLP LayerNorm; llama.cpp runs the file's eps everywhere
SCALE_RESOLUTION = 448  # MiniCPMV4_6ImageProcessorPil's default slice size
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                       window_kernel_size=[2, 2])  # MiniCPMV4_6VisionConfig


def spread_rows(n: int) -> np.ndarray:
    """For each cell of llama.cpp's 70x70 position grid, the row of an ``n``x``n`` table it stands for."""
    cell = np.arange(LLAMA_GRID) // (LLAMA_GRID // n)
    return (cell[:, None] * n + cell[None, :]).reshape(-1)


def _side(value) -> int | None:
    """A square side (transformers allows [h, w]), else None."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 2 and value[0] == value[1] else None
    return value


@register
class MiniCPMV46(Converter):
    architectures = ("MiniCPMV4_6ForConditionalGeneration", "MiniCPMV4_6Model")
    projector_type = "minicpmv4_6"  # clip-impl.h PROJECTOR_TYPE_MINICPMV4_6 (gguf-py 0.19 has none)
    family = "MiniCPM-V 4.6"
    image_tokens = ("<image>", "</image>", "<slice>", "</slice>")
    convention = Convention("MiniCPM-V", image_tokens, projectors=("resampler",))
    runtime_defects = (RuntimeDefect(
        "minicpmv4_6", "in 16x mode llama.cpp stretches an image no larger than the slice size to a square and "
        "slices an image of smaller area with one longer side, where transformers keeps the aspect ratio unsliced",
        "tools/mtmd/mtmd-image.cpp:517-525, 574 and 723; its aspect-keeping path (896) is 4x-only",
        seen_up_to="0.3.36", unless_key=(K.Projector.SCALE_FACTOR, 2)),)
    vision_prefixes = (TOWER, MERGER)
    layout_aliases = (("model.vision_tower.", TOWER), ("vision_tower.", TOWER),
                      ("model.merger.mlp.0.", MERGER), ("merger.mlp.0.", MERGER))

    @staticmethod
    def settings(config: dict) -> tuple[dict, dict]:
        """(vision config, top-level config) with transformers' defaults for missing keys."""
        top = {"insert_layer_id": 6, "downsample_mode": "16x", "merge_kernel_size": [2, 2], "merger_times": 1,
               **config}
        return {**VISION_DEFAULTS, **(config.get("vision_config") or {})}, top

    @classmethod
    def refuses(cls, config):
        v, top = cls.settings(config)
        image, patch = _side(v["image_size"]), _side(v["patch_size"])
        if not isinstance(image, int) or not isinstance(patch, int) or patch <= 0:
            return f"vision image_size {v['image_size']} / patch_size {v['patch_size']} are not square"
        grid = image // patch
        if grid <= 0 or LLAMA_GRID % grid:
            return (f"a {grid}x{grid} position grid: llama.cpp looks positions up on a {LLAMA_GRID}x{LLAMA_GRID} "
                    f"grid, which only a grid dividing {LLAMA_GRID} maps onto")
        if top["downsample_mode"] not in ("4x", "16x"):
            return f"downsample_mode {top['downsample_mode']!r} (llama.cpp runs 4x and 16x)"
        if list(v["window_kernel_size"]) != [2, 2] or list(top["merge_kernel_size"]) != [2, 2]:
            return "window or merge kernels other than 2x2 (llama.cpp's minicpmv4_6 graph merges 2x2)"
        if top["merger_times"] != 1:
            return f"merger_times {top['merger_times']} (llama.cpp's minicpmv4_6 graph runs one final merger)"
        if top["downsample_mode"] == "16x" and not 0 <= top["insert_layer_id"] < v["num_hidden_layers"]:
            return f"insert_layer_id {top['insert_layer_id']} is not a block of the {v['num_hidden_layers']} blocks"
        if v["layer_norm_eps"] != EPS:
            return (f"vision layer_norm_eps {v['layer_norm_eps']} (the final merger's norm is fixed at {EPS:g}, "
                    "and llama.cpp runs one eps for every norm)")
        if v["hidden_act"] not in ACTIVATIONS:
            return f"vision activation {v['hidden_act']!r} has no llama.cpp equivalent"
        return None

    @property
    def is_4x(self) -> bool:
        mode = self.settings(self.config)[1]["downsample_mode"]
        processor = self.ckpt.preprocessor_config.get("downsample_mode", mode)
        if processor != mode:
            raise UnsupportedModelError(f"{self.ckpt.path}: config.json downsample_mode {mode!r} but the processor's "
                                        f"is {processor!r}: transformers' model and processor disagree")
        return mode == "4x"

    def params(self) -> VisionParams:
        v, top = self.settings(self.config)
        mean, std = preprocessing(self.ckpt, SIGLIP_MEAN, SIGLIP_STD)  # MiniCPMV4_6ImageProcessorPil's defaults
        extra = {K.Projector.SCALE_FACTOR: 2 if self.is_4x else 4}
        if not self.is_4x:
            extra[K.WA_LAYER_INDEXES] = [top["insert_layer_id"]]
        return VisionParams(
            image_size=self.ckpt.preprocessor_config.get("scale_resolution", SCALE_RESOLUTION),
            patch_size=_side(v["patch_size"]), embedding_length=v["hidden_size"],
            feed_forward_length=v["intermediate_size"], block_count=v["num_hidden_layers"],
            head_count=v["num_attention_heads"], layer_norm_eps=EPS,
            projection_dim=self.text_config.get("hidden_size", 4096),  # Qwen3_5TextConfig's default
            image_mean=mean, image_std=std, **ACTIVATIONS[v["hidden_act"]], extra=extra)

    def skip(self, canonical):
        return self.is_4x and canonical.startswith(VIT_MERGER)

    def rename(self, canonical):
        for prefix, names in ((VIT_MERGER, VIT_MERGER_NAMES), (MERGER, MERGER_NAMES)):
            if canonical.startswith(prefix):
                module, _, kind = canonical[len(prefix):].rpartition(".")
                return f"{names[module]}.{kind}" if module in names and kind in ("weight", "bias") else None
        return super().rename(canonical)

    def modify(self, gguf_name, tensor):
        p = self.params()
        if gguf_name == POSITIONS:  # the checkpoint's grid spread over llama.cpp's 70x70 one
            tensor = tensor[spread_rows(_side(self.settings(self.config)[0]["image_size"]) // p.patch_size)]
        elif p.feed_forward_length == p.embedding_length and (m := FFN.fullmatch(gguf_name)):
            gguf_name = f"{NAMES[SWAPPED[m['part']]].format(bid=m['bid'])}.{m['kind']}"  # clip.cpp swaps them back
        yield gguf_name, tensor

    def model_inputs(self, pixel_values):
        """One image (1, 3, H, W) as transformers' processor packs it: patches in raster order, its grid."""
        import torch

        p = self.params().patch_size
        return {"pixel_values": pixel_values,
                "target_sizes": torch.tensor([[pixel_values.shape[2] // p, pixel_values.shape[3] // p]])}
