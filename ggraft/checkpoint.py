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

from .errors import InputError
from .safetensors_io import SafetensorsFile, TensorEntry

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"


def read_json(path: Path, what: str | None = None) -> Any:
    """A JSON file's content, or one clear InputError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: {what or 'file'} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


class Checkpoint:
    """A Hugging Face model directory.

    ``config`` is config.json; tensors are addressed by their names as saved.  Nothing
    is read from tensor data until ``load`` is called.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a directory (expected a Hugging Face checkpoint folder)")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise InputError(f"{self.path}: no config.json (is this a Hugging Face checkpoint folder?)")
        self.config: dict[str, Any] = read_json(cfg, "config.json")
        if not isinstance(self.config, dict):
            raise InputError(f"{cfg}: config.json is not a JSON object")
        self.files = self._open_weights()
        self.entries: dict[str, TensorEntry] = {}
        self._file_of: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name, entry in f.entries.items():
                self.entries[name] = entry
                self._file_of[name] = f

    # -- weights -------------------------------------------------------------------
    def _open_weights(self) -> list[SafetensorsFile]:
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, INDEX_NAME).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(f"{index}: has no weight_map")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise InputError(f"{index}: names shard {missing[0]} which is not in {self.path}")
            return [SafetensorsFile(self.path / n) for n in names]
        shards = sorted(self.path.glob("*.safetensors"))
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
            if p.is_file():
                data = read_json(p, name)
                # processor_config.json nests the image processor's settings
                return data.get("image_processor", data) if isinstance(data, dict) else {}
        return {}

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        p = self.path / "tokenizer_config.json"
        return read_json(p, "tokenizer_config.json") if p.is_file() else {}

    @cached_property
    def tokenizer_json(self) -> dict[str, Any]:
        p = self.path / "tokenizer.json"
        return read_json(p, "tokenizer.json") if p.is_file() else {}

    def added_tokens(self) -> dict[str, tuple[int, bool]]:
        """Added tokens as {content: (id, special)} from tokenizer_config.json / tokenizer.json."""
        found: dict[str, tuple[int, bool]] = {}
        for tid, info in (self.tokenizer_config.get("added_tokens_decoder") or {}).items():
            if isinstance(info, dict) and "content" in info:
                found[info["content"]] = (int(tid), bool(info.get("special", False)))
        for info in self.tokenizer_json.get("added_tokens") or []:
            if isinstance(info, dict) and "content" in info and "id" in info:
                found.setdefault(info["content"], (int(info["id"]), bool(info.get("special", False))))
        return found

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs or not isinstance(archs, list):
            raise InputError(f"{self.path}/config.json: no 'architectures' entry")
        return str(archs[0])
