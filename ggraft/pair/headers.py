"""What ``check`` reads from the pair's two headers: which file is which, a split text model's
shards, the projector type, and the two widths llama.cpp compares in ``mtmd_context``
(``clip_n_mmproj_embd`` vs ``llama_model_n_embd_inp``)."""
from __future__ import annotations

import re
from typing import Any

import gguf

from ggraft.errors import InputError
from ggraft.gguf_io import gguf_file
from ggraft.gguf_io.gguf_file import GGUFIndex
from .text_fit import mmproj_deepstack, text_deepstack
from .vocab import Vocab

K = gguf.Keys
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

#: clip.cpp ``clip_n_mmproj_embd``: the tensor and ggml dimension llama.cpp reads the projected
#: width from, per projector type (same llama.cpp as boundary_tokens.LLAMA_CPP_SOURCE).  Types not
#: listed fall back to ``clip.vision.projection_dim``.
WIDTH_TENSOR: dict[str, tuple[str, int]] = {
    **{p: ("mm.2.weight", 1) for p in ("mlp", "pixtral", "lightonocr", "dots_ocr", "dots3note_v", "muse-glimmer",
                                        "lfm2", "kimivl", "paddleocr", "kimik25", "yasa2", "deepseek4v", "phi4",
                                        "mimovl")},
    **{p: ("mm.2.bias", 0) for p in ("qwen2vl_merger", "qwen2.5vl_merger", "qwen2.5o", "qwen3vl_merger",
                                      "exaone4_5", "youtuvl", "ling3vl")},
    "janus_pro": ("mm.1.bias", 0),
    "gemma3": ("mm.input_projection.weight", 0), "gemma3nv": ("mm.input_projection.weight", 0),
    "gemma4v": ("mm.input_projection.weight", 1), "gemma4uv": ("mm.input_projection.weight", 1),
    **{p: ("mm.model.fc.weight", 1) for p in ("idefics3", "llama4", "step3vl", "hunyuanvl")},
    "internvl": ("mm.model.mlp.3.weight", 1), "nemotron_v2_vl": ("mm.model.mlp.3.weight", 1),
    **{p: ("mm.down.weight", 1) for p in ("glm4v", "glm5v", "minicpmv4_6", "cogvlm")},
    "resampler": ("resampler.proj.weight", 0),
    "adapter": ("adapter.linear.dense_4h_to_h.weight", 1),
    "minimax_m3": ("mm.merger.fc2.bias", 0),
    "ldp": ("mm.model.mb_block.1.block.2.1.bias", 0), "ldpv2": ("mm.model.peg.0.bias", 0),
}
MLP_NORM_TENSOR = ("mm.3.weight", "mm.3.bias", 0)  # "mlp" with mm.3 is llama.cpp's mlp_norm (Yi-type LLaVA)


def projector_type(m: GGUFIndex) -> str | None:
    value = m.value(K.Clip.PROJECTOR_TYPE) or m.value(K.ClipVision.PROJECTOR_TYPE)
    return value if isinstance(value, str) else None


def text_width(t: GGUFIndex) -> int | None:
    """llama.cpp's ``n_embd_inp``: embedding_length, times (1 + the DeepStack layers the architecture reads)."""
    arch = t.value(K.General.ARCHITECTURE, "")
    width = t.value(K.LLM.EMBEDDING_LENGTH.format(arch=arch))
    if not isinstance(width, int):
        return None
    return width * (1 + text_deepstack(t, arch))


def projection_width(m: GGUFIndex, projector: str | None) -> tuple[int | None, str]:
    """(width, where it came from) as llama.cpp derives it for the projector type."""
    spec = WIDTH_TENSOR.get(projector or "")
    if projector == "mlp" and m.tensor(MLP_NORM_TENSOR[0]) is not None:
        spec = MLP_NORM_TENSOR[1:]
    if spec is not None:
        t = m.tensor(spec[0])
        if t is not None and len(t.shape) > spec[1]:
            width = int(t.shape[spec[1]])
            width *= 1 + mmproj_deepstack(m, projector)  # main path + DeepStack features (qwen3vl_merger)
            return width, f"{spec[0]} dim {spec[1]}"
        return None, f"missing tensor {spec[0]}"
    dim = m.value(K.ClipVision.PROJECTION_DIM)
    if not isinstance(dim, int):
        return None, "no projection_dim key"
    # granite4_vision: one projection_dim slice per projector block (clip.cpp clip_n_mmproj_embd)
    return int(dim) * (1 + mmproj_deepstack(m, projector)), K.ClipVision.PROJECTION_DIM


def role(index: GGUFIndex) -> str:
    return "mmproj" if index.value(K.General.ARCHITECTURE) == "clip" else "text"


def refuse_wrong_roles(t: GGUFIndex, m: GGUFIndex) -> None:
    t_role, m_role = role(t), role(m)
    if t_role == "mmproj" and m_role == "text":
        raise InputError(f"the files are the wrong way round: {t.path} is an mmproj and {m.path} a text model",
                         hint=f"ggraft check {m.path} {t.path}")
    if t_role == "mmproj":
        raise InputError(f"{t.path}: is an mmproj (general.architecture 'clip'), not a text model")
    if m_role == "text":
        arch = m.value(K.General.ARCHITECTURE)
        what = f"general.architecture {arch!r}" if arch else "no general.architecture"
        raise InputError(f"{m.path}: is not an mmproj ({what}; an mmproj has 'clip')",
                         hint="give the text model first, then the mmproj")


def text_shards(t: GGUFIndex) -> list[GGUFIndex]:
    """All shards of a split text GGUF, first given; [t] when not split."""
    count = int(t.value(K.Split.LLM_KV_SPLIT_COUNT, 0) or 0)
    if count <= 1:
        return [t]
    no = int(t.value(K.Split.LLM_KV_SPLIT_NO, 0) or 0)
    named = SHARD_NAME.match(t.path.name)
    if no != 0:
        first = f"{named['prefix']}-00001-of-{count:05d}.gguf" if named else "the first shard"
        raise InputError(f"{t.path}: is shard {no + 1} of {count}; llama.cpp loads a split model from its first shard",
                         hint=f"give {t.path.with_name(first) if named else first}")
    if not named or int(named["count"]) != count:
        raise InputError(f"{t.path}: is shard 1 of {count} but not named <name>-00001-of-{count:05d}.gguf, "
                         "so llama.cpp cannot find the other shards")
    shards = [t]
    for i in range(1, count):
        path = t.path.with_name(f"{named['prefix']}-{i + 1:05d}-of-{count:05d}.gguf")
        if not path.exists():
            raise InputError(f"{path}: shard {i + 1} of {count} of {t.path.name} is missing")
        shards.append(gguf_file.scan_gguf(path, f"shard {i + 1} of {t.path.name}"))
    return shards


def describe_text(t: GGUFIndex, shards: list[GGUFIndex], vocab: Vocab) -> dict[str, Any]:
    arch = t.value(K.General.ARCHITECTURE, "")
    return {"path": str(t.path), "architecture": arch, "type": t.value(K.General.TYPE),
            "name": t.value(K.General.NAME), "embedding_length": text_width(t),
            "vocab_size": vocab.size, "tokenizer": vocab.model, "shards": len(shards),
            "chat_template": isinstance(t.value(K.Tokenizer.CHAT_TEMPLATE), str)}


def describe_mmproj(m: GGUFIndex, projector: str | None) -> dict[str, Any]:
    width, source = projection_width(m, projector)
    return {"path": str(m.path), "architecture": m.value(K.General.ARCHITECTURE), "type": m.value(K.General.TYPE),
            "name": m.value(K.General.NAME), "projector_type": projector, "projection_width": width,
            "projection_width_from": source, "projection_dim": m.value(K.ClipVision.PROJECTION_DIM),
            "has_vision_encoder": bool(m.value(K.Clip.HAS_VISION_ENCODER, False)),
            "has_audio_encoder": bool(m.value(K.Clip.HAS_AUDIO_ENCODER, False)),
            "image_size": m.value(K.ClipVision.IMAGE_SIZE), "patch_size": m.value(K.ClipVision.PATCH_SIZE)}
