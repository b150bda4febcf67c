"""Conversion speed and peak memory: `ggraft convert` vs llama.cpp's converter vs `cp`.

Builds once (cached in benchmarks/.work, outside git) a random-weight bf16 HF checkpoint, sharded
with an index like the real one (no transformers needed to build it), one per ``--family``:
  * ``pixtral`` (default): Mistral Small 3.1's vision side: Pixtral tower (24 layers, hidden 1024,
    intermediate 4096, 16 heads, patch 14, image 1540), patch merger, projector 1024 -> 5120, and a
    language-model part whose embed_tokens is 131072 x 5120 (the [IMG_BREAK] row lives there);
  * ``qwen3vl``: Qwen3-VL-8B's vision side (27 blocks, hidden 1152, intermediate 4304, 16 heads,
    patch 16, a 48 x 48 position grid, merger 4608 -> 4096 and DeepStack mergers after blocks
    8, 16 and 24), under the released names (``model.visual.*``); neither converter reads the
    language model for it, so it is left out.

Then times, alternating, several repetitions of
  * ggraft convert --outtype f16
  * llama.cpp's convert_hf_to_gguf.py --mmproj --outtype f16 (from the llama-cpp-python sdist of the
    pinned version, fetched with `pip download --no-binary :all:` into benchmarks/.work, never committed)
  * cp of the same bytes
and reports median wall time, peak RSS (of the child process) and the ratios.

    python benchmarks/bench_convert.py [--family pixtral|qwen3vl] [--reps 3] [--skip-llama-cpp]
                                       [--llama-cpp VENDORED_LLAMA_CPP_DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
TIME_GOAL = 0.3  # ggraft's time / llama.cpp's converter's (issue 15)
V_HIDDEN, V_FF, V_LAYERS, V_HEADS, PATCH, IMAGE = 1024, 4096, 24, 16, 14, 1540
T_HIDDEN, VOCAB, MERGE = 5120, 131072, 2
IMG, IMG_BREAK, IMG_END = 10, 12, 13


def pixtral_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "vision_tower.patch_conv.weight": (V_HIDDEN, 3, PATCH, PATCH),
        "vision_tower.ln_pre.weight": (V_HIDDEN,),
        "multi_modal_projector.norm.weight": (V_HIDDEN,),
        "multi_modal_projector.patch_merger.merging_layer.weight": (V_HIDDEN, V_HIDDEN * MERGE * MERGE),
        "multi_modal_projector.linear_1.weight": (T_HIDDEN, V_HIDDEN),
        "multi_modal_projector.linear_2.weight": (T_HIDDEN, T_HIDDEN),
        "language_model.model.embed_tokens.weight": (VOCAB, T_HIDDEN),
    }
    for i in range(V_LAYERS):
        p = f"vision_tower.transformer.layers.{i}."
        for proj in "qkvo":
            shapes[f"{p}attention.{proj}_proj.weight"] = (V_HIDDEN, V_HIDDEN)
        shapes[f"{p}attention_norm.weight"] = (V_HIDDEN,)
        shapes[f"{p}ffn_norm.weight"] = (V_HIDDEN,)
        shapes[f"{p}feed_forward.gate_proj.weight"] = (V_FF, V_HIDDEN)
        shapes[f"{p}feed_forward.up_proj.weight"] = (V_FF, V_HIDDEN)
        shapes[f"{p}feed_forward.down_proj.weight"] = (V_HIDDEN, V_FF)
    return shapes


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random bf16 bit patterns (as uint16) of N(0, 0.02), chunked to bound memory."""
    n = int(np.prod(shape))
    out = np.empty(n, dtype=np.uint16)
    step = 1 << 24
    for i in range(0, n, step):
        f = rng.standard_normal(min(step, n - i), dtype=np.float32)
        f *= 0.02
        out[i : i + len(f)] = (f.view(np.uint32) >> 16).astype(np.uint16)
    return out


def write_shard(path: Path, names: list[str], shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    header, offset = {}, 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * 2
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            random_bf16(shapes[name], rng).tofile(f)


def pixtral_shards(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    return {"model-00001-of-00002.safetensors": [n for n in shapes if not n.startswith("language_model.")],
            "model-00002-of-00002.safetensors": ["language_model.model.embed_tokens.weight"]}


def pixtral_files() -> dict[str, dict]:
    config = {
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
        "image_token_index": IMG, "multimodal_projector_bias": False, "projector_hidden_act": "gelu",
        "spatial_merge_size": MERGE, "vision_feature_layer": -1, "torch_dtype": "bfloat16",
        "text_config": {"model_type": "mistral", "hidden_size": T_HIDDEN, "vocab_size": VOCAB,
                        "intermediate_size": 32768, "num_hidden_layers": 40, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
                        "max_position_embeddings": 131072, "rope_theta": 1000000000.0},
        "vision_config": {"model_type": "pixtral", "hidden_size": V_HIDDEN, "intermediate_size": V_FF,
                          "num_hidden_layers": V_LAYERS, "num_attention_heads": V_HEADS, "head_dim": V_HIDDEN // V_HEADS,
                          "patch_size": PATCH, "image_size": IMAGE, "num_channels": 3, "rope_theta": 10000.0,
                          "hidden_act": "silu"},
    }
    preprocessor = {
        "image_processor_type": "PixtralImageProcessor", "patch_size": {"height": PATCH, "width": PATCH},
        "size": {"longest_edge": IMAGE}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}
    special = {IMG: "[IMG]", IMG_BREAK: "[IMG_BREAK]", IMG_END: "[IMG_END]", 1: "<s>", 2: "</s>"}
    tokenizer = {"added_tokens_decoder": {str(i): {"content": c, "special": True} for i, c in special.items()}}
    return {"config.json": config, "preprocessor_config.json": preprocessor, "tokenizer_config.json": tokenizer}


#: Qwen3-VL-8B-Instruct's vision side (config.json of the release)
Q_DEPTH, Q_HIDDEN, Q_FF, Q_HEADS, Q_PATCH, Q_GRID, Q_OUT, Q_DEEPSTACK = 27, 1152, 4304, 16, 16, 48, 4096, (8, 16, 24)


def qwen3vl_shapes() -> dict[str, tuple[int, ...]]:
    merged = Q_HIDDEN * 4  # the 2x2 merge
    shapes: dict[str, tuple[int, ...]] = {
        "model.visual.patch_embed.proj.weight": (Q_HIDDEN, 3, 2, Q_PATCH, Q_PATCH),
        "model.visual.patch_embed.proj.bias": (Q_HIDDEN,),
        "model.visual.pos_embed.weight": (Q_GRID * Q_GRID, Q_HIDDEN),
    }
    for i in range(Q_DEPTH):
        p = f"model.visual.blocks.{i}."
        shapes.update({f"{p}norm1.weight": (Q_HIDDEN,), f"{p}norm1.bias": (Q_HIDDEN,),
                       f"{p}attn.qkv.weight": (3 * Q_HIDDEN, Q_HIDDEN), f"{p}attn.qkv.bias": (3 * Q_HIDDEN,),
                       f"{p}attn.proj.weight": (Q_HIDDEN, Q_HIDDEN), f"{p}attn.proj.bias": (Q_HIDDEN,),
                       f"{p}norm2.weight": (Q_HIDDEN,), f"{p}norm2.bias": (Q_HIDDEN,),
                       f"{p}mlp.linear_fc1.weight": (Q_FF, Q_HIDDEN), f"{p}mlp.linear_fc1.bias": (Q_FF,),
                       f"{p}mlp.linear_fc2.weight": (Q_HIDDEN, Q_FF), f"{p}mlp.linear_fc2.bias": (Q_HIDDEN,)})
    mergers = {"model.visual.merger.": Q_HIDDEN,
               **{f"model.visual.deepstack_merger_list.{i}.": merged for i in range(len(Q_DEEPSTACK))}}
    for p, norm in mergers.items():
        shapes.update({f"{p}norm.weight": (norm,), f"{p}norm.bias": (norm,),
                       f"{p}linear_fc1.weight": (merged, merged), f"{p}linear_fc1.bias": (merged,),
                       f"{p}linear_fc2.weight": (Q_OUT, merged), f"{p}linear_fc2.bias": (Q_OUT,)})
    return shapes


def qwen3vl_shards(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    names = list(shapes)
    half = len(names) // 2
    return {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}


def qwen3vl_files() -> dict[str, dict]:
    config = {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "torch_dtype": "bfloat16",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": False,
        "text_config": {"model_type": "qwen3_vl_text", "hidden_size": Q_OUT, "intermediate_size": 12288,
                        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "rms_norm_eps": 1e-6, "vocab_size": 151936, "max_position_embeddings": 262144,
                        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True}, "rope_theta": 5000000},
        "vision_config": {"model_type": "qwen3_vl", "depth": Q_DEPTH, "hidden_size": Q_HIDDEN,
                          "intermediate_size": Q_FF, "num_heads": Q_HEADS, "patch_size": Q_PATCH, "num_position_embeddings": Q_GRID * Q_GRID,
                          "out_hidden_size": Q_OUT, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "in_channels": 3, "hidden_act": "gelu_pytorch_tanh",
                          "deepstack_visual_indexes": list(Q_DEEPSTACK)},
    }
    preprocessor = {"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": Q_PATCH, "merge_size": 2,
                    "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                    "size": {"longest_edge": 16777216, "shortest_edge": 65536}}
    return {"config.json": config, "preprocessor_config.json": preprocessor}


@dataclass(frozen=True)
class Family:
    """A benchmark checkpoint: its folder, tensors, shards, side files, and the prefix of the
    tensors that stay out of the mmproj (for the largest tensor written)."""

    folder: str
    shapes: Callable[[], dict[str, tuple[int, ...]]]
    shards: Callable[[dict[str, tuple[int, ...]]], dict[str, list[str]]]
    files: Callable[[], dict[str, dict]]
    not_written: str = ""


FAMILIES = {
    "pixtral": Family("mistral-small-3.1-vision-bf16", pixtral_shapes, pixtral_shards, pixtral_files,
                      not_written="language_model."),
    "qwen3vl": Family("qwen3-vl-8b-vision-bf16", qwen3vl_shapes, qwen3vl_shards, qwen3vl_files),
}


def build_checkpoint(family: Family) -> Path:
    ckpt = WORK / family.folder
    if (ckpt / "config.json").exists():
        return ckpt
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = family.shapes()
    rng = np.random.default_rng(0)
    weight_map = {}
    for fname, names in family.shards(shapes).items():
        print(f"  writing {fname} ...", flush=True)
        write_shard(tmp / fname, names, shapes, rng)
        weight_map.update({n: fname for n in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for fname, data in family.files().items():
        (tmp / fname).write_text(json.dumps(data, indent=1))
    os.replace(tmp, ckpt)
    return ckpt


def llama_cpp_converter(vendored: Path | None = None) -> Path | None:
    """convert_hf_to_gguf.py of ``vendored`` (a llama.cpp folder), else from the pinned
    llama-cpp-python sdist (downloaded once)."""
    if vendored is not None:
        return vendored / "convert_hf_to_gguf.py" if (vendored / "convert_hf_to_gguf.py").exists() else None
    pinned = version("llama-cpp-python")
    root = WORK / f"llama_cpp_python-{pinned}" / "vendor" / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").exists():
        print(f"  fetching the llama-cpp-python {pinned} sdist ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={pinned}", "-d", str(WORK)], check=True)
        with tarfile.open(WORK / f"llama_cpp_python-{pinned}.tar.gz") as tar:
            tar.extractall(WORK, filter="data")
    return root / "convert_hf_to_gguf.py" if (root / "convert_hf_to_gguf.py").exists() else None


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """(wall seconds, peak RSS in bytes of the child, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(f"  {' '.join(cmd[:3])} ... failed: {proc.stderr.read().decode()[-600:]}", file=sys.stderr)
    return elapsed, usage.ru_maxrss * 1024, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--family", choices=sorted(FAMILIES), default="pixtral")
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp source folder (default: the pinned sdist's)")
    args = ap.parse_args()
    family = FAMILIES[args.family]
    WORK.mkdir(parents=True, exist_ok=True)
    print("building the benchmark checkpoint (once) ...", flush=True)
    ckpt = build_checkpoint(family)
    src_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    ggraft = str(Path(sys.executable).with_name("ggraft"))
    out = WORK / "out"
    out.mkdir(exist_ok=True)
    jobs = {"ggraft": [ggraft, "convert", str(ckpt), "-o", str(out / "ggraft.gguf"), "--outtype", "f16", "--force"],
            "cp": ["cp", "-r", str(ckpt), str(out / "copy")]}
    env = None
    conv = None if args.skip_llama_cpp else llama_cpp_converter(args.llama_cpp)
    if conv:
        jobs["llama.cpp"] = [sys.executable, str(conv), str(ckpt), "--mmproj", "--outtype", "f16",
                             "--outfile", str(out / "llama.gguf")]
        env = {**os.environ, "PYTHONPATH": str(conv.parent / "gguf-py")}
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in jobs}
    for rep in range(args.reps):
        for name, cmd in jobs.items():
            # every tool writes new files (replacing one makes ext4 allocate its blocks at once: auto_da_alloc)
            shutil.rmtree(out / "copy", ignore_errors=True)
            for stale in ("ggraft.gguf", "llama.gguf"):
                (out / stale).unlink(missing_ok=True)
            secs, rss, code = timed(cmd, env if name == "llama.cpp" else None)
            if code == 0:
                results[name].append((secs, rss))
            print(f"  rep {rep + 1} {name:9s} {secs:7.2f} s  peak RSS {rss / 2**20:7.0f} MiB" + ("" if code == 0 else "  FAILED"))
    shutil.rmtree(out / "copy", ignore_errors=True)
    shapes = family.shapes()
    largest_written = max(int(np.prod(s)) for n, s in shapes.items()
                          if not (family.not_written and n.startswith(family.not_written))) * 2
    print(f"\ncheckpoint: {src_bytes / 1e9:.2f} GB bf16; largest tensor written (f16): {largest_written / 2**20:.0f} MiB")
    med = {k: (statistics.median(s for s, _ in v), max(r for _, r in v)) for k, v in results.items() if v}
    print("| tool | median wall s | peak RSS MiB |")
    print("|---|---|---|")
    for k, (s, r) in med.items():
        print(f"| {k} | {s:.2f} | {r / 2**20:.0f} |")
    if "ggraft" in med:
        g = med["ggraft"][0]
        if "llama.cpp" in med:
            print(f"ggraft / llama.cpp time: {g / med['llama.cpp'][0]:.2f} (goal <= {TIME_GOAL})")
        if "cp" in med:
            print(f"ggraft / cp time: {g / med['cp'][0]:.2f} (goal <= 2)")
        budget = largest_written + 256 * 2**20
        print(f"ggraft peak RSS {med['ggraft'][1] / 2**20:.0f} MiB vs budget {budget / 2**20:.0f} MiB "
              f"(largest tensor written + 256 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
