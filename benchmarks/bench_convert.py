"""Conversion speed and peak memory: `ggraft convert` vs llama.cpp's converter vs `cp`.

Builds once (cached in benchmarks/.work, outside git) a random-weight bf16 HF checkpoint shaped
like Mistral Small 3.1's vision side: Pixtral tower (24 layers, hidden 1024, intermediate 4096,
16 heads, patch 14, image 1540), patch merger, projector 1024 -> 5120, and a language-model part
whose embed_tokens is 131072 x 5120 (the [IMG_BREAK] row lives there), sharded with an index like
the real one.  No transformers needed to build it.

Then times, alternating, several repetitions of
  * ggraft convert --outtype f16
  * llama.cpp's convert_hf_to_gguf.py --mmproj --outtype f16 (from the llama-cpp-python sdist of the
    pinned version, fetched with `pip download --no-binary :all:` into benchmarks/.work, never committed)
  * cp of the same bytes
and reports median wall time, peak RSS (of the child process) and the ratios.

    python benchmarks/bench_convert.py [--reps 3] [--skip-llama-cpp]
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
from importlib.metadata import version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
CKPT = WORK / "mistral-small-3.1-vision-bf16"
V_HIDDEN, V_FF, V_LAYERS, V_HEADS, PATCH, IMAGE = 1024, 4096, 24, 16, 14, 1540
T_HIDDEN, VOCAB, MERGE = 5120, 131072, 2
IMG, IMG_BREAK, IMG_END = 10, 12, 13


def tensor_shapes() -> dict[str, tuple[int, ...]]:
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


def build_checkpoint() -> Path:
    if (CKPT / "config.json").exists():
        return CKPT
    tmp = CKPT.with_name(CKPT.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes()
    rng = np.random.default_rng(0)
    vision = [n for n in shapes if not n.startswith("language_model.")]
    shards = {"model-00001-of-00002.safetensors": vision,
              "model-00002-of-00002.safetensors": ["language_model.model.embed_tokens.weight"]}
    weight_map = {}
    for fname, names in shards.items():
        print(f"  writing {fname} ...", flush=True)
        write_shard(tmp / fname, names, shapes, rng)
        weight_map.update({n: fname for n in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
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
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "PixtralImageProcessor", "patch_size": {"height": PATCH, "width": PATCH},
        "size": {"longest_edge": IMAGE}, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    special = {IMG: "[IMG]", IMG_BREAK: "[IMG_BREAK]", IMG_END: "[IMG_END]", 1: "<s>", 2: "</s>"}
    (tmp / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(i): {"content": c, "special": True} for i, c in special.items()}}))
    os.replace(tmp, CKPT)
    return CKPT


def llama_cpp_converter() -> Path | None:
    """convert_hf_to_gguf.py from the pinned llama-cpp-python sdist (downloaded once)."""
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
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    print("building the benchmark checkpoint (once) ...", flush=True)
    ckpt = build_checkpoint()
    src_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    ggraft = str(Path(sys.executable).with_name("ggraft"))
    out = WORK / "out"
    out.mkdir(exist_ok=True)
    jobs = {"ggraft": [ggraft, "convert", str(ckpt), "-o", str(out / "ggraft.gguf"), "--outtype", "f16", "--force"],
            "cp": ["cp", "-r", str(ckpt), str(out / "copy")]}
    env = None
    conv = None if args.skip_llama_cpp else llama_cpp_converter()
    if conv:
        jobs["llama.cpp"] = [sys.executable, str(conv), str(ckpt), "--mmproj", "--outtype", "f16",
                             "--outfile", str(out / "llama.gguf")]
        env = {**os.environ, "PYTHONPATH": str(conv.parent / "gguf-py")}
    results: dict[str, list[tuple[float, int]]] = {k: [] for k in jobs}
    for rep in range(args.reps):
        for name, cmd in jobs.items():
            shutil.rmtree(out / "copy", ignore_errors=True)
            secs, rss, code = timed(cmd, env if name == "llama.cpp" else None)
            if code == 0:
                results[name].append((secs, rss))
            print(f"  rep {rep + 1} {name:9s} {secs:7.2f} s  peak RSS {rss / 2**20:7.0f} MiB" + ("" if code == 0 else "  FAILED"))
    shutil.rmtree(out / "copy", ignore_errors=True)
    shapes = tensor_shapes()
    largest_written = max(int(np.prod(s)) for n, s in shapes.items() if not n.startswith("language_model.")) * 2
    print(f"\ncheckpoint: {src_bytes / 1e9:.2f} GB bf16; largest tensor written (f16): {largest_written / 2**20:.0f} MiB")
    med = {k: (statistics.median(s for s, _ in v), max(r for _, r in v)) for k, v in results.items() if v}
    print("| tool | median wall s | peak RSS MiB |")
    print("|---|---|---|")
    for k, (s, r) in med.items():
        print(f"| {k} | {s:.2f} | {r / 2**20:.0f} |")
    if "ggraft" in med:
        g = med["ggraft"][0]
        if "llama.cpp" in med:
            print(f"ggraft / llama.cpp time: {g / med['llama.cpp'][0]:.2f} (goal <= 0.5)")
        if "cp" in med:
            print(f"ggraft / cp time: {g / med['cp'][0]:.2f} (goal <= 2)")
        budget = largest_written + 256 * 2**20
        print(f"ggraft peak RSS {med['ggraft'][1] / 2**20:.0f} MiB vs budget {budget / 2**20:.0f} MiB "
              f"(largest tensor written + 256 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
