"""``ggraft verify``: the mmproj in llama.cpp against the checkpoint in transformers, on the
same pixels (an image already at the model's size, so nothing is resized).

The tests use this same code.  transformers and torch are needed here only (``ggraft[verify]``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ggraft.pair import engine
from ggraft.pair.headers import projection_width
from ggraft.pair.runtime import preflight_mmproj
from ggraft.gguf_io import gguf_file, output_types
from ggraft.hf.checkpoint import Checkpoint
from ggraft.mmproj.converter import Converter, converter_for
from ggraft.errors import EngineError, InputError



@dataclass
class Comparison:
    tokens: int
    min_cosine: float
    mean_cosine: float
    max_rel_error: float


@dataclass
class VerifyReport:
    checkpoint: str
    mmproj: str
    projector_type: str
    outtype: str
    bar: float
    image_size: tuple[int, int]
    result: Comparison | None
    passed: bool
    problem: str | None = None
    #: set when llama.cpp's runtime itself departs from transformers (see Converter.runtime_reference)
    runtime_note: str | None = None
    runtime_result: Comparison | None = None
    #: non-finite values llama.cpp emitted in the rows left out of the comparison (e.g. Pixtral's
    #: [IMG_BREAK] rows): a runtime fault the text model would see, reported but not judged here
    nonfinite_outside: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the largest test image side verify builds, in pixels
MAX_SIDE = 4096
#: projector types whose image layout mtmd derives from the text model's rope type (hunyuanvl: mtmd.cpp
#: 1528-1531 aborts unless it is M-RoPE), which llama.cpp reads only when it loads the model whole: a
#: vocabulary-only load returns before the hyper-parameters (src/llama-model.cpp:1317)
NEEDS_TEXT_HPARAMS = ("hunyuanvl",)


def checked_image_size(conv: Converter, size: tuple[int, int] | None) -> tuple[int, int]:
    """The test image size: the family's own, or ``size`` if each side is a multiple of the unit
    the family's images are aligned to (what divides its own sides and two patches), up to
    ``MAX_SIDE`` pixels."""
    default = conv.test_image_size()
    if size is None:
        return default
    unit = math.gcd(*default, 2 * conv.params().patch_size)
    if not all(unit <= side <= MAX_SIDE and side % unit == 0 for side in size):
        raise InputError(f"--image-size {size[0]}x{size[1]}: each side must be a multiple of {unit} pixels, "
                         f"from {unit} to {MAX_SIDE - MAX_SIDE % unit}, for {conv.family}",
                         f"the family's own test image is {default[0]}x{default[1]}")
    return size


def test_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test image: smooth gradients with seeded noise (uint8, H x W x 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
    img = base * 200 + rng.normal(0, 25, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def compare(llama: np.ndarray, reference: np.ndarray) -> Comparison:
    """Per-token cosine and max relative error (max |a-b| / max |b|)."""
    if llama.shape != reference.shape:
        raise ValueError(f"llama.cpp gave {llama.shape[0]}x{llama.shape[1]} embeddings, "
                         f"transformers {reference.shape[0]}x{reference.shape[1]}")
    a, b = llama.astype(np.float64), reference.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    rel = float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))
    return Comparison(len(cos), float(cos.min()), float(cos.mean()), rel)


def as_rows(features: Any) -> np.ndarray:
    """transformers' image features (tensor, list of tensors or a ModelOutput) as (tokens, dim)."""
    if hasattr(features, "pooler_output") and features.pooler_output is not None:
        features = features.pooler_output
    elif getattr(features, "deepstack_features", None):  # (LLM layer, per-image rows) pairs: one layer's rows
        features = features.deepstack_features[0][1]
    elif getattr(features, "last_hidden_state", None) is not None:  # projected by the forward (Llama 4)
        features = features.last_hidden_state
    if isinstance(features, (list, tuple)):
        features = [f.reshape(-1, f.shape[-1]) for f in features]
        import torch

        features = torch.cat(features, 0)
    return features.detach().float().reshape(-1, features.shape[-1]).cpu().numpy()


def load_reference_model(ckpt: Checkpoint, class_name: str | None = None, attn_implementation: str | None = None):
    """The checkpoint in transformers (float32, eval): ``class_name`` or its architecture's class;
    ``attn_implementation="eager"`` where attention weights are wanted (probe)."""
    try:
        import torch
        import transformers
    except ImportError:
        raise InputError("verify and probe need torch and transformers", hint="pip install 'ggraft[verify]'") from None
    class_name = class_name or ckpt.architecture
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise InputError(f"the installed transformers {transformers.__version__} has no {class_name}")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        return cls.from_pretrained(ckpt.path, dtype=torch.float32, **extra).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InputError(f"{ckpt.path}: transformers cannot load this checkpoint ({first})") from None


def pixel_values(img: np.ndarray, mean: list[float], std: list[float]):
    import torch

    x = (img.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))


def llama_embeddings(mmproj: Path, img: np.ndarray, n_embd: int, text: Path | None, n_threads: int | None,
                     vocab_only: bool = True) -> np.ndarray:
    model = engine.load_text_model(text, vocab_only=vocab_only) if text else None
    try:
        with engine.VisionEncoder(mmproj, model, n_threads=n_threads) as enc:
            return enc.encode(img, n_embd)
    finally:
        engine.free_text_model(model)


def reference_embeddings(conv: Converter, model, img: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(transformers' features, the same computed the way this llama.cpp runtime does, or None)."""
    import torch

    mean, std = conv.params().image_mean, conv.params().image_std
    pv = pixel_values(img, mean, std)
    with torch.no_grad():
        ref = as_rows(conv.reference_features(model, pv))
        runtime = conv.runtime_reference(model, pv)
    return ref, (as_rows(runtime) if runtime is not None else None)


def verify(hf_dir: str | Path, mmproj: str | Path, text: str | Path | None = None,
           n_threads: int | None = None, image_size: tuple[int, int] | None = None) -> VerifyReport:
    ckpt = Checkpoint(hf_dir)
    conv = converter_for(ckpt)
    mmproj = Path(mmproj)
    preflight_mmproj(mmproj)  # what llama.cpp would refuse or crash on is refused before it is loaded
    reader = gguf_file.scan_gguf(mmproj, "mmproj GGUF")
    ftype = gguf_file.value(reader, "general.file_type", gguf.LlamaFileType.ALL_F32)
    written = output_types.by_file_type(ftype)  # its bar: the minimum per-token cosine for the type
    outtype, bar = (written.name, written.bar) if written else ("unknown", output_types.LOOSEST_BAR)
    projector = gguf_file.value(reader, gguf.Keys.Clip.PROJECTOR_TYPE, "")
    n_embd = projection_width(reader, projector)[0]  # as llama.cpp derives it (DeepStack features included)
    del reader
    if not n_embd:
        raise InputError(f"{mmproj}: has no {gguf.Keys.ClipVision.PROJECTION_DIM}")
    size = checked_image_size(conv, image_size)
    img = test_image(*size)
    report = VerifyReport(str(ckpt.path), str(mmproj), projector, outtype, bar, tuple(size), None, False)

    try:
        raw = llama_embeddings(mmproj, img, int(n_embd), Path(text) if text else None, n_threads,
                               vocab_only=projector not in NEEDS_TEXT_HPARAMS)
    except EngineError as e:
        if text is None and "llama_vocab" in e.message:
            raise InputError(f"{mmproj}: llama.cpp puts text tokens around {projector} images, which needs the "
                             "text model's vocabulary", hint="pass --text with the text GGUF (only its vocabulary is loaded)") from None
        raise
    rows = conv.llama_rows(raw)
    report.nonfinite_outside = int((~np.isfinite(raw)).sum() - (~np.isfinite(rows)).sum())
    model = load_reference_model(ckpt, conv.reference_class())
    try:
        ref, runtime = reference_embeddings(conv, model, img)
    except (RuntimeError, ValueError, IndexError) as e:
        if image_size is None or tuple(image_size) == tuple(conv.test_image_size()):
            raise
        raise InputError(f"--image-size {size[0]}x{size[1]}: transformers' {ckpt.architecture} cannot take an image "
                         f"of this size ({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__})",
                         f"the family's own test image is {'x'.join(map(str, conv.test_image_size()))}") from None
    try:
        report.result = compare(rows, ref)
    except ValueError as e:
        report.problem = str(e)
        return report
    report.passed = report.result.min_cosine >= bar
    if not report.passed and runtime is not None:
        report.runtime_result = compare(rows, runtime)
        if report.runtime_result.min_cosine >= bar:
            report.runtime_note = conv.runtime_note
    return report
