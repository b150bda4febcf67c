"""The shape of a converter, and the one registry of them.

A converter turns the vision side of one family of Hugging Face checkpoints into mmproj
tensors and keys.  It holds only what is special about its family: which architectures it
takes, its projector type, its hyper-parameters, how its checkpoint names map to GGUF names
(mostly through gguf-py's ``TensorNameMap``) and what must be reshaped.  The shared writer
(``ggraft.mmproj``) does the rest.

Converter modules live in ``ggraft.converters`` and are found by ``discover()``; the core
never imports one by name.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import gguf
import numpy as np
from gguf.lazy import LazyNumpyTensor

from ggraft.hf.checkpoint import Checkpoint, vision_language_config
from ggraft.errors import InputError, UnsupportedModelError
from .facts import Convention, RuntimeDefect

Lazy = LazyNumpyTensor


def in_memory(values: np.ndarray) -> Lazy:
    """An array already in memory, as a lazy tensor."""
    return Lazy(meta=Lazy.meta_with_dtype_and_shape(values.dtype, values.shape), args=(values,), func=lambda v: v)


@dataclass
class VisionParams:
    """The ``clip.vision.*`` hyper-parameters every vision mmproj carries."""

    image_size: int
    patch_size: int
    embedding_length: int
    feed_forward_length: int
    block_count: int
    head_count: int
    layer_norm_eps: float
    projection_dim: int
    image_mean: list[float]
    image_std: list[float]
    use_gelu: bool = False
    use_silu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # family keys, written by the family


@dataclass(frozen=True)
class Recipient:
    """What ``ggraft graft`` takes from the text model an mmproj is made for: its rows for the
    family's ``text_rows`` tokens and its ids for the image tokens."""

    rows: dict[str, np.ndarray]
    token_ids: dict[str, int]


class Converter:
    """Base of every family converter; see the module docstring."""

    architectures: ClassVar[tuple[str, ...]] = ()
    projector_type: ClassVar[str] = ""
    family: ClassVar[str] = ""
    #: the image tokens the family's processor puts in the text (graft checks the recipient has them)
    image_tokens: ClassVar[tuple[str, ...]] = ()
    #: how the family's tokenizers mark images (``ggraft audit``); may list more than image_tokens
    convention: ClassVar[Convention | None] = None
    #: known ways llama.cpp's runtime departs from transformers for this family (check warns,
    #: verify compares with ``runtime_reference`` as well)
    runtime_defects: ClassVar[tuple[RuntimeDefect, ...]] = ()
    #: checkpoint name prefixes that belong to the vision side; anything else is ignored
    vision_prefixes: ClassVar[tuple[str, ...]] = ("vision_tower.", "multi_modal_projector.")
    #: (alias, canonical) prefix rewrites so every saved layout maps onto TensorNameMap's names
    layout_aliases: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: mmproj tensors that are rows of the language model's embedding table, by token
    #: (e.g. Pixtral's v.token_embd.img_break): ``text_row`` reads them from the checkpoint, or
    #: ``ggraft graft`` supplies the recipient's (``recipient``)
    text_rows: ClassVar[dict[str, str]] = {}
    #: architectures (config.json spellings) that transformers builds under another class name
    reference_classes: ClassVar[dict[str, str]] = {}

    def __init__(self, ckpt: Checkpoint, recipient: Recipient | None = None):
        self.ckpt = ckpt
        self.config = ckpt.config
        section = vision_language_config(ckpt.config)  # an omni model's thinker
        self.vision_config: dict[str, Any] = section.get("vision_config") or {}
        self.text_config: dict[str, Any] = section.get("text_config") or {}
        self.recipient = recipient

    def __init_subclass__(cls, **kwargs):
        """A family's ``params()`` is computed once per converter (tensors() asks for it often)."""
        super().__init_subclass__(**kwargs)
        if "params" in cls.__dict__:
            compute = cls.__dict__["params"]

            @functools.wraps(compute)
            def params(self):
                memo = self.__dict__.setdefault("_params", {})
                if cls not in memo:
                    memo[cls] = compute(self)
                return memo[cls]

            cls.params = params

    # -- what a family provides --------------------------------------------------------
    @classmethod
    def refuses(cls, config: dict[str, Any]) -> str | None:
        """Why this converter cannot take a checkpoint of one of its architectures (None: it can);
        ``config`` is ``vision_language_config`` of the checkpoint's (an omni model's thinker's)."""
        return None

    @classmethod
    def claims(cls, config: dict[str, Any]) -> bool:
        """Whether a config of a shared architecture is this family's at all (LLaVA's class holds CLIP,
        SigLIP or Pixtral towers): a claiming converter's refusal is the one shown."""
        return True

    def params(self) -> VisionParams:
        raise NotImplementedError

    def skip(self, canonical: str) -> bool:
        """True for a vision-side tensor the family deliberately leaves out of the mmproj."""
        return False

    def rename(self, canonical: str) -> str | None:
        """GGUF name for a canonical checkpoint name (None: unmappable, which is an error).
        The default asks gguf-py's TensorNameMap."""
        return self.name_map.get_name(canonical, try_suffixes=(".weight", ".bias"))

    def modify(self, gguf_name: str, tensor: Lazy) -> Iterator[tuple[str, Lazy]]:
        """Reshape, split or fuse one tensor; the default passes it through."""
        yield gguf_name, tensor

    def extra_tensors(self) -> Iterator[tuple[str, Lazy]]:
        """Tensors that do not come from the vision side: by default the ``text_rows``, from the
        recipient when there is one, else from the checkpoint (``text_row``)."""
        for gguf_name, token in self.text_rows.items():
            if self.recipient is not None:
                yield gguf_name, in_memory(self.recipient.rows[token])
            else:
                yield gguf_name, self.text_row(token)

    def text_row(self, token: str) -> Lazy:
        """``token``'s row of the checkpoint's language-model embedding table (families with ``text_rows``)."""
        raise NotImplementedError(f"{type(self).__name__} declares text_rows but cannot read them")

    def token_ids(self) -> dict[str, int]:
        """The ids of the image tokens: the recipient's when grafting, else the checkpoint tokenizer's."""
        if self.recipient is not None:
            return dict(self.recipient.token_ids)
        added = self.ckpt.added_tokens()
        return {t: added[t][0] for t in self.image_tokens if t in added}

    def test_image_size(self) -> tuple[int, int]:
        """(height, width) of an image this family takes without resizing."""
        size = self.params().image_size
        return size, size

    def reference_class(self) -> str:
        """The transformers class that builds this checkpoint (verify and probe load it)."""
        return self.reference_classes.get(self.ckpt.architecture, self.ckpt.architecture)

    def model_inputs(self, pixel_values: Any) -> dict[str, Any]:
        """The image arguments transformers' model takes (its forward and ``get_image_features``) for
        ``pixel_values`` (1, 3, H, W), laid out as the family's processor lays out one image."""
        return {"pixel_values": pixel_values}

    def processor_inputs(self, pixel_values: Any) -> dict[str, Any]:
        """The image ``pixel_values`` holds, through the checkpoint's own transformers image processor:
        ``model_inputs`` of families whose processor tiles (anyres) in ways one tensor cannot show."""
        from PIL import Image
        from transformers import AutoImageProcessor

        p = self.params()
        mean, std = (np.asarray(x, np.float32)[:, None, None] for x in (p.image_mean, p.image_std))
        rgb = np.clip(np.rint((pixel_values[0].numpy() * std + mean) * 255), 0, 255).astype(np.uint8)
        try:
            processor = AutoImageProcessor.from_pretrained(self.ckpt.path)
        except (OSError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(f"{self.ckpt.path}: transformers cannot load its image processor ({first})",
                             hint="the anyres layout comes from the checkpoint's preprocessor_config.json") from None
        return dict(processor(images=Image.fromarray(rgb.transpose(1, 2, 0)), return_tensors="pt"))

    def reference_features(self, model: Any, pixel_values: Any) -> Any:
        """transformers' image features for ``pixel_values`` (1, 3, H, W), one row per image token
        the language model reads; used by verify and probe."""
        return model.get_image_features(**self.model_inputs(pixel_values))

    @property
    def runtime_note(self) -> str | None:
        """What ``runtime_reference`` emulates: the family's runtime defects, in one line."""
        return "; ".join(f"{d.summary} ({d.reference})" for d in self.runtime_defects) or None

    def runtime_reference(self, model: Any, pixel_values: Any) -> Any:
        """transformers' modules run the way the installed llama.cpp runtime runs this family,
        where that is known to differ (``runtime_defects``); None when it is not known to."""
        return None

    def llama_rows(self, rows: np.ndarray) -> np.ndarray:
        """llama.cpp's output rows that correspond to transformers' features (default: all)."""
        return rows

    # -- shared machinery --------------------------------------------------------------
    @property
    def name_map(self) -> gguf.TensorNameMap:
        if not hasattr(self, "_name_map"):
            self._name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.MMPROJ, self.params().block_count)
        return self._name_map

    def canonical(self, name: str) -> str:
        for alias, canonical in self.layout_aliases:
            if name.startswith(alias):
                return canonical + name[len(alias):]
        return name

    def lazy(self, name: str) -> Lazy:
        """A checkpoint tensor as a lazy numpy tensor: nothing is read until it is written."""
        entry = self.ckpt.entries[name]
        meta = Lazy.meta_with_dtype_and_shape(entry.numpy_dtype, entry.shape)
        return Lazy(meta=meta, args=(name,), func=self.ckpt.load)

    def tensors(self) -> Iterator[tuple[str, Lazy]]:
        """(gguf name, lazy tensor) for every tensor of the mmproj, in checkpoint order."""
        for name in self.ckpt.names():
            canonical = self.canonical(name)
            if not canonical.startswith(self.vision_prefixes) or self.skip(canonical):
                continue
            gguf_name = self.rename(canonical)
            if gguf_name is None:
                raise UnsupportedModelError(
                    f"{self.ckpt.path}: cannot map tensor {name!r} to an mmproj tensor ({self.family} converter)"
                )
            yield from self.modify(gguf_name, self.lazy(name))
        yield from self.extra_tensors()


REGISTRY: dict[str, list[type[Converter]]] = {}


def register(cls: type[Converter]) -> type[Converter]:
    """Class decorator: make a converter available for its HF architectures."""
    for arch in cls.architectures:
        REGISTRY.setdefault(arch, []).append(cls)
    return cls


def discover() -> dict[str, list[type[Converter]]]:
    """Import every module of ``ggraft.converters`` once, so their @register runs."""
    package = importlib.import_module("ggraft.converters")
    for mod in pkgutil.iter_modules(package.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{mod.name}")
    return REGISTRY


def converter_for(ckpt: Checkpoint) -> Converter:
    """The converter for a checkpoint, or an error naming the architecture and the supported ones."""
    registry = discover()
    arch = ckpt.architecture
    reasons = []
    for cls in registry.get(arch, []):
        config = vision_language_config(ckpt.config)
        reason = cls.refuses(config)
        if reason is None:
            return cls(ckpt)
        reasons.append((not cls.claims(config), reason))
    if reasons:
        raise UnsupportedModelError(f"{ckpt.path}: {arch}: {sorted(reasons, key=lambda r: r[0])[0][1]}")
    supported = ", ".join(sorted(registry))
    raise UnsupportedModelError(f"{ckpt.path}: unsupported architecture {arch!r}; supported: {supported}")


def preprocessing(ckpt: Checkpoint, default_mean: list[float], default_std: list[float]) -> tuple[list[float], list[float]]:
    """image_mean / image_std from preprocessor_config.json, else the family's defaults."""
    pre = ckpt.preprocessor_config
    mean, std = pre.get("image_mean", default_mean), pre.get("image_std", default_std)
    if len(mean) != 3 or len(std) != 3:
        raise InputError(f"{ckpt.path}: preprocessor image_mean/image_std must have 3 values")
    return [float(x) for x in mean], [float(x) for x in std]
