"""Reading a Hugging Face checkpoint directory: config, preprocessor config, tokenizer
files and (sharded) safetensors weights, memory-mapped and validated up front.

Pickle weights (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused: loading them can
run arbitrary code.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ggraft.errors import InputError, input_file
from .config_values import ConfigSection, block_limit_of
from .safetensors_io import SafetensorsFile, TensorEntry

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path, what: str | None = None) -> Any:
    """A JSON file's content, or one clear InputError (only regular files are opened)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: {what or 'file'} not found")
    input_file(path, what or "JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise InputError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None


def read_json_object(path: Path, what: str, block_limit=None) -> ConfigSection:
    """A JSON file that must hold an object, as a ``ConfigSection`` (values checked when read)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path}: {what} is not a JSON object")
    return ConfigSection(data, path, block_limit=block_limit)


def vision_language_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the part that reads images: an omni model (Qwen2.5-Omni, Qwen3-Omni) nests its
    thinker's ``vision_config``, ``text_config`` and image token under ``thinker_config``; any other
    model's is the config itself."""
    return config.get("thinker_config") or config


class Checkpoint:
    """A Hugging Face model directory.

    ``config`` is config.json; tensors are addressed by their names as saved.  Nothing
    is read from tensor data until ``load`` is called.
    """

    #: how tensors are named: "hf" (transformers) or "mistral" (Mistral's native consolidated layout)
    layout = "hf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory (expected a Hugging Face checkpoint folder)")
        self.entries: dict[str, TensorEntry] = {}
        self._file_of: dict[str, SafetensorsFile] = {}
        #: layer counts in the config are bounded by the numbered blocks the tensors hold
        self.block_limit = block_limit_of(lambda: self.entries)
        self.config: dict[str, Any] = self._read_config()
        self.files = self._open_weights()
        for f in self.files:
            for name, entry in f.entries.items():
                self.entries[name] = entry
                self._file_of[name] = f

    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.exists() and not cfg.is_symlink():
            raise InputError(f"{self.path}: no config.json (is this a Hugging Face checkpoint folder?)")
        config = read_json_object(cfg, "config.json", self.block_limit)
        config.validate("architectures", "vision_config", "text_config")
        return config

    # -- weights -------------------------------------------------------------------
    def _open_weights(self, index_name: str = INDEX_NAME, pattern: str = "*.safetensors") -> list[SafetensorsFile]:
        index = self.path / index_name
        if index.exists():
            return [SafetensorsFile(self.path / n) for n in self._shards_in_index(index, index_name)]
        shards = sorted(self.path.glob(pattern))
        if shards:
            return [SafetensorsFile(p) for p in shards]
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(
                f"{self.path}: only pickle weights ({', '.join(pickles[:3])}); ggraft refuses pickle "
                "because loading it can run arbitrary code",
                hint="convert the weights to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))",
            )
        raise InputError(f"{self.path}: no *.safetensors weights found")

    def _shards_in_index(self, index: Path, index_name: str) -> list[str]:
        """The shard file names an index's weight_map names, each a file of this folder."""
        weight_map = read_json_object(index, index_name).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index}: has no weight_map (expected an object of tensor name -> shard file)")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
                raise InputError(f"{index}: weight_map[{json.dumps(tensor)[:60]}] is {json.dumps(shard)[:40]}; "
                                 "expected the file name of a shard in the same folder")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (self.path / n).exists()]
        if missing:
            raise InputError(f"{index}: names shard {missing[0]} which is not in {self.path}")
        return names

    def has(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> Iterator[str]:
        return iter(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def load(self, name: str) -> np.ndarray:
        """A tensor's values as a numpy array (bf16 widened to f32)."""
        try:
            return self._file_of[name].load(name)
        except KeyError:
            raise InputError(f"{self.path}: tensor {name!r} not found") from None

    def load_rows(self, name: str, first: int, count: int = 1) -> np.ndarray:
        """Only rows ``first:first+count`` of a tensor (e.g. one embedding row)."""
        try:
            f = self._file_of[name]
        except KeyError:
            raise InputError(f"{self.path}: tensor {name!r} not found") from None
        return f.load_rows(name, first, count)

    # -- side files ----------------------------------------------------------------
    @cached_property
    def preprocessor_config(self) -> dict[str, Any]:
        """preprocessor_config.json, or {} when the checkpoint has none."""
        for name in ("preprocessor_config.json", "processor_config.json"):
            p = self.path / name
            if p.exists():
                data = read_json_object(p, name)
                # processor_config.json nests the image processor's settings
                return data.get("image_processor") or data
        return {}

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        p = self.path / "tokenizer_config.json"
        return read_json_object(p, "tokenizer_config.json") if p.exists() else {}

    @cached_property
    def tokenizer_json(self) -> dict[str, Any]:
        p = self.path / "tokenizer.json"
        return read_json_object(p, "tokenizer.json") if p.exists() else {}

    def added_tokens(self) -> dict[str, tuple[int, bool]]:
        """Added tokens as {content: (id, special)} from tokenizer_config.json / tokenizer.json."""
        found: dict[str, tuple[int, bool]] = {}
        decoder = self.tokenizer_config.get("added_tokens_decoder")
        for tid, info in (decoder.items() if isinstance(decoder, dict) else ()):
            if isinstance(info, dict) and isinstance(info.get("content"), str) and str(tid).isdigit():
                found[info["content"]] = (int(tid), bool(info.get("special", False)))
        added = self.tokenizer_json.get("added_tokens")
        for info in added if isinstance(added, list) else ():
            if isinstance(info, dict) and isinstance(info.get("content"), str) and isinstance(info.get("id"), int):
                found.setdefault(info["content"], (info["id"], bool(info.get("special", False))))
        return found

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise InputError(f"{self.path}/config.json: no 'architectures' entry")
        return archs[0]


# -- Mistral's native layout --------------------------------------------------------------
NATIVE_PARAMS = "params.json"
NATIVE_INDEX = "consolidated.safetensors.index.json"
#: params.json's ids of the image tokens (-1 placeholders mean: ask tekken.json)
NATIVE_TOKEN_KEYS = {"image_token_id": "[IMG]", "image_break_token_id": "[IMG_BREAK]", "image_end_token_id": "[IMG_END]"}
_NATIVE_VISION_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "patch_size", "image_size")


class MistralCheckpoint(Checkpoint):
    """A model folder in Mistral's native layout: params.json, consolidated*.safetensors, tekken.json.

    ``config`` restates params.json as the transformers config the same model has on the hub
    (``native_config``), so converters read one vocabulary of hyper-parameters; tensor names stay
    native (``vision_encoder.*``, ``vision_language_adapter.*``, ``tok_embeddings.weight``), which
    ``layout = "mistral"`` tells converters.
    """

    layout = "mistral"

    def _read_config(self) -> dict[str, Any]:
        path = self.path / NATIVE_PARAMS
        self.params = read_json_object(path, NATIVE_PARAMS, self.block_limit)
        return ConfigSection(native_config(self.params, path), path, block_limit=self.block_limit)

    def _open_weights(self, index_name: str = NATIVE_INDEX,
                      pattern: str = "consolidated*.safetensors") -> list[SafetensorsFile]:
        return super()._open_weights(index_name, pattern)

    @cached_property
    def tekken(self) -> dict[str, Any]:
        p = self.path / "tekken.json"
        data = read_json(p, "tekken.json") if p.is_file() else {}
        return data if isinstance(data, dict) else {}

    def added_tokens(self) -> dict[str, tuple[int, bool]]:
        """Special tokens from tekken.json (by rank), then params.json's image token ids, then any
        Hugging Face tokenizer files alongside."""
        found: dict[str, tuple[int, bool]] = {}
        specials = self.tekken.get("special_tokens")
        for entry in specials if isinstance(specials, list) else ():
            if isinstance(entry, dict) and "token_str" in entry and isinstance(entry.get("rank"), int):
                found[str(entry["token_str"])] = (entry["rank"], True)
        vision = native_vision_params(self.params) or {}
        for key, token in NATIVE_TOKEN_KEYS.items():
            if isinstance(vision.get(key), int) and vision[key] >= 0:
                found.setdefault(token, (vision[key], True))
        for token, info in super().added_tokens().items():
            found.setdefault(token, info)
        return found


def native_vision_params(params: dict[str, Any]) -> dict[str, Any] | None:
    """params.json's vision encoder section (``vision_encoder``, or ``multimodal.vision_encoder_args``)."""
    vision = params.get("vision_encoder") or (params.get("multimodal") or {}).get("vision_encoder_args")
    return vision if isinstance(vision, dict) else None


def native_config(params: dict[str, Any], where: Path) -> dict[str, Any]:
    """params.json as the equivalent transformers config (what Mistral publishes as config.json)."""
    if not isinstance(params.get("dim"), int):
        raise InputError(f"{where}: has no integer 'dim' (not a Mistral params.json?)")
    text = {"model_type": "mistral", "hidden_size": params["dim"], "num_hidden_layers": params.get("n_layers"),
            "num_attention_heads": params.get("n_heads"), "num_key_value_heads": params.get("n_kv_heads"),
            "head_dim": params.get("head_dim"), "intermediate_size": params.get("hidden_dim"),
            "rms_norm_eps": params.get("norm_eps", 1e-5), "vocab_size": params.get("vocab_size"),
            "rope_theta": params.get("rope_theta")}
    text = {k: v for k, v in text.items() if v is not None}
    v = native_vision_params(params)
    if v is None:
        return {"architectures": ["MistralForCausalLM"], **text}
    missing = [k for k in _NATIVE_VISION_REQUIRED if not isinstance(v.get(k), int)]
    if missing:
        raise InputError(f"{where}: vision_encoder has no integer {missing[0]!r}")
    merges = v.get("mm_projector_id") == "patch_merge"
    vision = {"model_type": "pixtral", "hidden_act": "silu", "num_channels": v.get("num_channels", 3),
              "rope_parameters": {"rope_type": "axial", "rope_theta": v.get("rope_theta", 10000.0)},
              **{k: v[k] for k in _NATIVE_VISION_REQUIRED}}
    config = {"architectures": ["Mistral3ForConditionalGeneration" if merges else "LlavaForConditionalGeneration"],
              "text_config": text, "vision_config": vision, "projector_hidden_act": "gelu",
              "vision_feature_layer": -1, "multimodal_projector_bias": bool(v.get("adapter_bias", True))}
    if isinstance(v.get("image_token_id"), int) and v["image_token_id"] >= 0:
        config["image_token_index"] = v["image_token_id"]
    if merges:
        config["spatial_merge_size"] = v.get("spatial_merge_size", 2)
    else:
        config["vision_feature_select_strategy"] = "full"
    return config


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A model folder in either layout: transformers' (config.json), else Mistral's native (params.json)."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / NATIVE_PARAMS).is_file():
        return MistralCheckpoint(p)
    return Checkpoint(p)
