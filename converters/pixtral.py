"""Pixtral vision towers -> projector ``pixtral``: Mistral Small 3.1/3.2 and Magistral
(``Mistral3ForConditionalGeneration``) and Pixtral-12B (``LlavaForConditionalGeneration`` with a
Pixtral vision config), in the transformers layout or Mistral's native one (params.json).

What is special here:
- 2D RoPE: transformers keeps q/k in rotate-half order, llama.cpp ropes interleaved pairs
  (Mistral's native order), so transformers' q/k are permuted back; native ones pass through.
- Mistral3 puts an RMSNorm and a patch merger (``spatial_merge_size``) before the 2-layer GELU
  projector; TensorNameMap names them ``mm.input_norm``, ``mm.patch_merger``, ``mm.1``, ``mm.2``.
- the mmproj carries ``v.token_embd.img_break``, the [IMG_BREAK] row of the language model's
  embedding table, which llama.cpp appends after every row of image tokens but the last
  (``llama_rows`` takes those out again before comparing with transformers).
- llama.cpp fixes the vision rope base at 10000, the projector activation at GELU and reads
  only the last hidden state; anything else is refused rather than converted wrongly.
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from ggraft.mmproj.converter import Converter, Lazy, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from ggraft.errors import InputError, UnsupportedModelError
from ._image_norms import CLIP_MEAN, CLIP_STD

NORM_EPS = 1e-5  # hard-coded in transformers' PixtralRMSNorm and in mistral-inference
IMG_BREAK = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_TOK_EMBD_IMG_BREAK]
EMBEDDINGS = ("language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
              "tok_embeddings.weight")
_ROPED = re.compile(r"v\.blk\.\d+\.attn_[qk]\.weight")
_BLOCK = re.compile(r"\.layers\.(\d+)\.")
_PROJECTOR = re.compile(r"multi_modal_projector\.linear_([12])\.(weight|bias)")


@register
class Pixtral(Converter):
    architectures = ("Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration")
    projector_type = gguf.VisionProjectorType.PIXTRAL
    family = "Pixtral (Mistral Small 3.x, Pixtral-12B)"
    image_tokens = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
    convention = Convention("Pixtral / Mistral", image_tokens)
    runtime_defects = (RuntimeDefect(
        "pixtral", "llama.cpp builds the [IMG_BREAK] rows it inserts from an unwritten buffer times 0, so they "
        "often hold NaN entries", "ggraft README, Known llama.cpp deviations", seen_up_to="0.3.36"),)
    #: mmproj tensors that are rows of the language model's embedding table, by token
    text_rows = {IMG_BREAK: "[IMG_BREAK]"}
    layout_aliases = (
        ("model.vision_tower.", "vision_tower."),  # the module names (transformers 5 in memory)
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    native_aliases = (  # Mistral's consolidated.safetensors
        ("vision_language_adapter.w_in.", "multi_modal_projector.linear_1."),
        ("vision_language_adapter.w_out.", "multi_modal_projector.linear_2."),
        ("pre_mm_projector_norm.", "multi_modal_projector.norm."),
        ("patch_merger.", "multi_modal_projector.patch_merger."),
    )

    def __init__(self, ckpt, recipient=None):
        super().__init__(ckpt, recipient)
        self.native = ckpt.layout == "mistral"
        if self.native:
            self.layout_aliases = self.native_aliases
            self.vision_prefixes = ("vision_encoder.", "multi_modal_projector.")
        self.merges = ckpt.architecture == "Mistral3ForConditionalGeneration"

    @classmethod
    def claims(cls, config):
        return (config.get("vision_config") or {}).get("model_type") == "pixtral"

    @classmethod
    def refuses(cls, config):
        v = config.get("vision_config") or {}
        if v.get("model_type") != "pixtral":
            return f"vision tower {v.get('model_type', 'clip_vision_model')!r} is not Pixtral"
        theta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", 10000.0))
        if float(theta) != 10000.0:
            return f"vision rope_theta {theta}: llama.cpp's pixtral graph fixes it at 10000"
        if config.get("projector_hidden_act", "gelu") != "gelu":
            return f"projector_hidden_act {config['projector_hidden_act']!r}: llama.cpp's pixtral projector is GELU"
        if v.get("hidden_act", "gelu") not in ("gelu", "silu"):
            return f"vision hidden_act {v['hidden_act']!r} has no llama.cpp equivalent"
        if config.get("vision_feature_select_strategy", "full") != "full":
            return "vision_feature_select_strategy 'default' (dropping the first patch) has no llama.cpp equivalent"
        if blocks_run(config) is None:
            return (f"vision_feature_layer {config.get('vision_feature_layer')}: llama.cpp's pixtral graph reads "
                    "the output of one vision block")
        return None

    @property
    def merge(self) -> int:
        return int(self.config.get("spatial_merge_size", 2)) if self.merges else 1

    def params(self) -> VisionParams:
        v = self.vision_config
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)
        extra = {}
        if self.merges:
            extra[gguf.Keys.ClipVision.SPATIAL_MERGE_SIZE] = self.merge
        return VisionParams(
            image_size=v.get("image_size", 1024), patch_size=v.get("patch_size", 16),
            embedding_length=v.get("hidden_size", 1024), feed_forward_length=v.get("intermediate_size", 4096),
            block_count=blocks_run(self.config),  # llama.cpp runs every block it finds
            head_count=v.get("num_attention_heads", 16), layer_norm_eps=NORM_EPS,
            projection_dim=self.text_config.get("hidden_size", 5120), image_mean=mean, image_std=std,
            use_gelu=v.get("hidden_act", "gelu") == "gelu", use_silu=v.get("hidden_act") == "silu", extra=extra,
        )

    def skip(self, canonical):
        block = _BLOCK.search(canonical)
        return block is not None and int(block.group(1)) >= self.params().block_count

    def rename(self, canonical):
        # TensorNameMap's multi_modal_projector.linear_{bid} (mm.{bid}) only reaches bid < block_count
        m = _PROJECTOR.fullmatch(canonical)
        if m:
            return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=m.group(1))}.{m.group(2)}"
        return super().rename(canonical)

    def modify(self, gguf_name, tensor):
        if _ROPED.fullmatch(gguf_name) and not self.native:  # rotate-half -> interleaved pairs
            n_head, rows = self.params().head_count, tensor.shape[0]
            tensor = tensor.reshape(n_head, 2, rows // n_head // 2, *tensor.shape[1:]).swapaxes(1, 2).reshape(tensor.shape)
        yield gguf_name, tensor

    def text_row(self, token: str) -> Lazy:
        """``token``'s row of the language model's embedding table, read only when written."""
        embeddings = next((n for n in EMBEDDINGS if self.ckpt.has(n)), None)
        if embeddings is None:
            raise InputError(f"{self.ckpt.path}: no language-model embedding table ({EMBEDDINGS[0]}) to take "
                             f"the {token} row from")
        vocab, width = self.ckpt.shape(embeddings)
        if width != self.params().projection_dim:
            raise UnsupportedModelError(f"{self.ckpt.path}: {embeddings} is {width} wide, "
                                        f"the projector {self.params().projection_dim}")
        tid = self.token_ids().get(token)
        if tid is None or not 0 <= tid < vocab:
            found = f"id {tid} is outside the {vocab}-row table" if tid is not None else "it is not in the tokenizer"
            raise InputError(f"{self.ckpt.path}: cannot take the {token} row: {found}",
                             hint="the id comes from tokenizer_config.json, tokenizer.json or tekken.json")
        meta = Lazy.meta_with_dtype_and_shape(np.float32, (width,))
        return Lazy(meta=meta, args=(embeddings, tid), func=lambda name, row: self.ckpt.load_rows(name, row, 1).reshape(-1))

    def test_image_size(self):
        side = self.params().patch_size * self.merge  # llama.cpp aligns to this; 3x4 grid: no resize
        return 3 * side, 4 * side

    def model_inputs(self, pixel_values):
        import torch

        return {"pixel_values": pixel_values, "image_sizes": torch.tensor([list(pixel_values.shape[-2:])])}

    def reference_features(self, model, pixel_values):
        kw = {} if self.merges else {"vision_feature_select_strategy": "full"}
        return model.get_image_features(**self.model_inputs(pixel_values),
                                        vision_feature_layer=self.config.get("vision_feature_layer", -1), **kw)

    def llama_rows(self, rows):
        """llama.cpp's rows less the [IMG_BREAK] after each row of the test image's grid but the last."""
        h, w = self.test_image_size()
        side = self.params().patch_size * self.merge
        per_row, n_rows = w // side, h // side
        if len(rows) != n_rows * (per_row + 1) - 1:
            return rows  # not the test image's grid: leave it to verify to report the shapes
        return rows[[r * (per_row + 1) + c for r in range(n_rows) for c in range(per_row)]]


def blocks_run(config) -> int | None:
    """How many vision blocks give the hidden state the projector reads (None: not one llama.cpp can give)."""
    layer, n = config.get("vision_feature_layer", -1), (config.get("vision_config") or {}).get("num_hidden_layers", 24)
    if not isinstance(layer, int) or isinstance(layer, bool):
        return None
    blocks = layer if layer >= 0 else n + 1 + layer  # hidden_states[0] is the input of block 0
    return blocks if 0 < blocks <= n else None
