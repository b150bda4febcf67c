"""Granite 4 Vision (SigLIP tower, Window Q-Former projectors, anyres tiles) -> projector ``granite4_vision``.

What is special here:
- several projectors read hidden states of the tower: ``deepstack_layer_map`` pairs (vision hidden
  state, LLM layer) and ``spatial_target_layers`` one spatial projector per LLM layer, all from
  ``spatial_vision_layer``.  llama.cpp numbers them ``v.proj_blk.<b>`` in the order of their LLM
  layer and appends their outputs to one embedding per token (``projection_dim`` each); the text
  model (``granite.deepstack_mapping``) takes slice 0 as the input embedding and adds slice b
  before its LLM layer, as transformers does.  Only the spatial projectors a target layer names
  are run; the others are left out.
- ``clip.vision.feature_layer`` holds *block* indices (``layer_outs[i]`` is block i's output):
  transformers' hidden state k >= 1 is block k - 1, a negative k is block n + k.
- each projector: LayerNorm (eps 1e-6 in transformers, the tower's eps in llama.cpp: refused unless
  equal), windows of ``window_side`` patches read by ``query_side``-square queries through one BLIP-2
  Q-Former layer (64-wide heads, eps 1e-12, exact GELU, all fixed in llama.cpp), then a Linear.
  Deepstack projectors area-downsample (llama.cpp: average pooling, so window_side must be a
  multiple of query_side); spatial ones take one corner of each 2x2 patch (query_side = window_side/2).
  ``query`` and ``image_positions`` are stored 2-D; the Q-Former layer is gguf-py's ``a.proj_blk``
  table under the ``v.`` prefix (clip-impl.h TN_QF_*, one block per projector); the other names
  are clip-impl.h's TN_MULTI_PROJ_* (gguf-py 0.19 has neither for vision).
- anyres: llama.cpp always encodes the overview and the tile grid of the best pinpoint, with
  ``image_newline`` after each row of tiles (repeated for every projector slice), as transformers'
  ``pack_image_features`` does; ``reference_features`` builds transformers' tiles from the image.
Layouts: ``model.vision_tower.*`` (transformers 5) and ``model.vision_tower.vision_model.*`` (the hub's).
"""
from __future__ import annotations

import re

import gguf
import numpy as np

from ggraft.mmproj.converter import Converter, VisionParams, preprocessing, register
from ggraft.mmproj.facts import Convention

from ._image_norms import CLIP_MEAN, CLIP_STD, GELU_ACTS

TOWER = "vision_tower.vision_model."
PROJ = re.compile(r"model\.(?:layerwise|spatial)_projectors\.\d+\.(?P<rest>.+)")
QF_LAYER = "qformer.encoder.layer.0."
MULTI = {"query": "query", "image_positions": "img_pos", "norm": "norm", "out_linear": "linear",
         "qformer.layernorm": "post_norm"}  # clip-impl.h TN_MULTI_PROJ_*: v.proj_blk.<b>.<name>
#: clip-impl.h keys gguf-py 0.19 does not have
FEATURE_LAYER, PINPOINTS = "clip.vision.feature_layer", "clip.vision.image_grid_pinpoints"
QUERY_SIDE, WINDOW_SIDE = "clip.vision.projector.query_side", "clip.vision.projector.window_side"
SPATIAL_OFFSETS = "clip.vision.projector.spatial_offsets"
#: transformers' defaults: SiglipVisionConfig, Granite4VisionConfig, its Q-Former init kwargs / Blip2QFormerConfig
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
              patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", model_type="clip_vision_model")
TOP = dict(spatial_vision_layer=-1, spatial_target_layers=[12, 15, 18, 21], vision_feature_select_strategy="default",
           image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
QFORMER = dict(num_hidden_layers=12, layer_norm_eps=1e-12, hidden_act="gelu")


def settings(config) -> tuple[dict, dict, dict, int]:
    """(vision, top-level, Q-Former config, text layers), transformers' defaults filled in."""
    q = config.get("qformer_config")
    q = {**QFORMER, **(q if q is not None else {"num_hidden_layers": 1})}
    text = config.get("text_config") or {}
    top = {**TOP, **{k: value for k, value in config.items() if value is not None}}  # None: the default
    return {**VISION, **(config.get("vision_config") or {})}, top, q, text.get("num_hidden_layers", 32)


def projectors(config) -> list[tuple[str, int, int, int]]:
    """(checkpoint prefix, block, LLM layer, spatial offset or -1) per projector run, by LLM layer."""
    v, top, _, _ = settings(config)
    n = v["num_hidden_layers"]
    block = lambda k: (k if k >= 0 else n + 1 + k) - 1  # noqa: E731  hidden state k -> the block that made it
    out = [(f"model.layerwise_projectors.{i}.", block(k), llm, -1)
           for i, (k, llm) in enumerate(top.get("deepstack_layer_map") or [])]
    out += [(f"model.spatial_projectors.{g}.", block(top["spatial_vision_layer"]), llm, g)
            for g, llm in enumerate(top["spatial_target_layers"])]
    return sorted(out, key=lambda p: p[2])


@register
class Granite4Vision(Converter):
    architectures = ("Granite4VisionForConditionalGeneration",)
    projector_type = "granite4_vision"  # clip-impl.h PROJECTOR_TYPE_GRANITE4_VISION; not in gguf-py 0.19
    family = "Granite 4 Vision"
    image_tokens = ("<image>",)
    convention = Convention("LLaVA", ("<image>",), projectors=("mlp",))  # LLaVA-NeXT's processor and token
    vision_prefixes = (TOWER, "model.layerwise_projectors.", "model.spatial_projectors.", "model.image_newline")
    layout_aliases = (("model.vision_tower.vision_model.", TOWER), ("model.vision_tower.", TOWER))

    @classmethod
    def refuses(cls, config):
        v, top, q, n_text = settings(config)
        rate = top.get("downsample_rate")
        query, window = (int(s) for s in rate.split("/")) if isinstance(rate, str) and re.fullmatch(
            r"[1-9]\d*/[1-9]\d*", rate) else (0, 0)
        side, layers = v["image_size"] // v["patch_size"], [p[2] for p in projectors(config)]
        if v["model_type"] != "siglip_vision_model":
            return f"vision tower {v['model_type']!r} (llama.cpp's granite4_vision graph runs SigLIP, without CLS)"
        if top["vision_feature_select_strategy"] != "full":
            return "vision_feature_select_strategy 'default' drops a CLS token a SigLIP tower does not have"
        if v["hidden_act"] not in GELU_ACTS or q["hidden_act"] != "gelu":
            return (f"activations {v['hidden_act']!r}/{q['hidden_act']!r} (llama.cpp runs GELU in the tower, "
                    "exact GELU in the Q-Former)")
        if v["hidden_size"] % 64 or v["layer_norm_eps"] != 1e-6 or q["layer_norm_eps"] != 1e-12:
            return (f"vision width {v['hidden_size']}, eps {v['layer_norm_eps']}, Q-Former eps {q['layer_norm_eps']} "
                    "(llama.cpp's projectors use 64-wide heads, eps 1e-6 and 1e-12)")
        if q["num_hidden_layers"] != 1:
            return f"a Q-Former of {q['num_hidden_layers']} layers (llama.cpp runs one)"
        if not (query and side % window == 0 and window % query == 0):
            return f"downsample_rate {rate!r} on a {side}x{side} patch grid (llama.cpp pools whole windows)"
        if len(top["spatial_target_layers"]) > 4 or (top["spatial_target_layers"] and window != 2 * query):
            return "spatial projectors need 4 at most and a downsample rate of 1/2"
        if not top.get("deepstack_layer_map") or any(p[1] not in range(v["num_hidden_layers"])
                                                      for p in projectors(config)):
            return "a projector reads no vision block (transformers needs deepstack_layer_map; 0 is the embeddings)"
        if min(layers) != 0 or len(set(layers)) != len(layers) or max(layers) >= n_text:
            return f"target LLM layers {layers}: llama.cpp needs distinct layers within the model, the first 0"
        if any(h % v["image_size"] or w % v["image_size"] for h, w in top["image_grid_pinpoints"]):
            return f"image_grid_pinpoints not multiples of the {v['image_size']}-pixel tile"
        return None

    def params(self) -> VisionParams:
        v, top, _, _ = settings(self.config)
        mean, std = preprocessing(self.ckpt, CLIP_MEAN, CLIP_STD)  # LlavaNextImageProcessor's defaults
        query, window = (int(s) for s in top["downsample_rate"].split("/"))
        runs = projectors(self.config)
        return VisionParams(
            image_size=v["image_size"], patch_size=v["patch_size"], embedding_length=v["hidden_size"],
            feed_forward_length=v["intermediate_size"], block_count=v["num_hidden_layers"],
            head_count=v["num_attention_heads"], layer_norm_eps=v["layer_norm_eps"],
            projection_dim=(self.config.get("text_config") or {}).get("hidden_size", 4096),
            image_mean=mean, image_std=std, use_gelu=True,
            extra={FEATURE_LAYER: [p[1] for p in runs], SPATIAL_OFFSETS: [p[3] for p in runs],
                   QUERY_SIDE: query, WINDOW_SIDE: window,
                   PINPOINTS: [x for h, w in top["image_grid_pinpoints"] for x in (w, h)]})  # llama.cpp: (w, h)

    def skip(self, canonical):
        m = PROJ.fullmatch(canonical)
        return canonical.startswith((TOWER + "post_layernorm.", TOWER + "head.")) or bool(m) and not any(
            p[0] == canonical[:m.start("rest")] for p in projectors(self.config))

    def rename(self, canonical):
        m = PROJ.fullmatch(canonical)
        if m is None:
            return super().rename(canonical)
        b = next(b for b, p in enumerate(projectors(self.config)) if p[0] == canonical[:m.start("rest")])
        rest = m["rest"]
        module, _, kind = rest.rpartition(".")
        if rest in MULTI:
            return f"v.proj_blk.{b}.{MULTI[rest]}"
        if module in MULTI:
            return f"v.proj_blk.{b}.{MULTI[module]}.{kind}"
        if not rest.startswith(QF_LAYER):
            return None
        qf = gguf.TensorNameMap(gguf.MODEL_ARCH.MMPROJ, b + 1)  # granite speech's names: a.proj_blk.<b>.*
        name = qf.get_name(f"projector.qformer.encoder.layer.{b}.{rest[len(QF_LAYER):]}",
                           try_suffixes=(".weight", ".bias"))
        return name and "v." + name.removeprefix("a.")

    def modify(self, gguf_name, tensor):
        if gguf_name.endswith((".query", ".img_pos")):  # (1, tokens, width) -> (tokens, width)
            tensor = tensor.reshape(tensor.shape[-2:])
        yield gguf_name, tensor

    def tensors(self):
        """In name order, so every layout writes its tensors in the same order."""
        return iter(sorted(super().tensors(), key=lambda item: item[0]))

    def test_image_size(self) -> tuple[int, int]:
        """The tile itself when it is a pinpoint (overview and tile are the image), else the first pinpoint."""
        s, pins = self.params().image_size, settings(self.config)[1]["image_grid_pinpoints"]
        return (s, s) if [s, s] in [list(p) for p in pins] else tuple(pins[0])

    def model_inputs(self, pixel_values):
        """The processor's anyres layout of the image (base image and tiles, image_sizes): what the
        forward reads (probe); verify compares through ``reference_features``."""
        return self.processor_inputs(pixel_values)

    def reference_features(self, model, pixel_values):
        """transformers' features for the overview and the tiles of an image the size of a pinpoint
        (the overview resized with Pillow's bicubic filter, as llama.cpp's resize_pillow and the
        slow processor do), one projector slice after another in llama.cpp's order."""
        import torch
        from PIL import Image

        s, (h, w) = self.params().image_size, pixel_values.shape[-2:]
        if [h, w] not in [list(p) for p in settings(self.config)[1]["image_grid_pinpoints"]]:
            raise ValueError(f"{h}x{w} is not one of the image_grid_pinpoints")
        mean, std = (np.asarray(x, np.float32)[:, None, None] for x in (self.params().image_mean,
                                                                         self.params().image_std))
        overview = pixel_values[0]
        if (h, w) != (s, s):
            rgb = np.clip(np.rint((overview.numpy() * std + mean) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            small = np.asarray(Image.fromarray(rgb).resize((s, s), Image.BICUBIC), np.float32).transpose(2, 0, 1)
            overview = torch.from_numpy((small / 255 - mean) / std)
        tiles = [pixel_values[0, :, y:y + s, x:x + s] for y in range(0, h, s) for x in range(0, w, s)]
        out = model.get_image_features(pixel_values=torch.stack([overview, *tiles])[None],
                                       image_sizes=torch.tensor([[h, w]]))
        by_layer = dict((layer, torch.cat(f, 0)) for layer, f in out.deepstack_features)
        return torch.cat([by_layer[p[2]] for p in projectors(self.config)], dim=-1)
