"""Benchmark ``ggraft merge`` on three ~1 GB GGUF text models against ``cp`` of the same bytes.

The inputs are built once under ``benchmarks/.work/merge`` (outside git): models with
Qwen2.5-0.5B's shapes (hidden 896, 24 layers, FFN 4864, q/k/v biases, vocabulary 151936, tied
output) and a tokenizer of its size (151936 tokens, 151387 merges, which the merge copies),
F16, random weights: a base and two "fine-tunes" (base + noise).  As in VisCodex, they are
siblings: the "VLM" is written under Qwen2.5-VL's text architecture ``qwen2vl`` (with M-RoPE
sections), the base and the "code" model under ``qwen2``, and the config names the VLM as
``metadata_source``.  Then, with the page cache warm:

- ``cp`` of the three files (best of ``--repeat``, each run after ``sync``): the bandwidth to beat;
- ``ggraft merge`` (task_arithmetic, weights 0.7 / 0.5, so all three inputs are read) to f16 and
  to q8_0, in a subprocess: wall time, input bytes per second, and its peak RSS (``wait4``).

Run: ``.venv/bin/python benchmarks/bench_merge.py`` (not part of the tests).  Prints a Markdown
table and writes ``benchmarks/.work/merge/results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

from ggraft.gguf_io import gguf_file

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work" / "merge"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 896, 4864, 24, 14, 2, 151936
HEAD_DIM = HIDDEN // HEADS
N_MERGES = 151387
ARCHS = {"base": "qwen2", "vlm": "qwen2vl", "code": "qwen2"}
MROPE_SECTIONS = [16, 24, 24, 0]  # Qwen2.5-VL's (any sections summing to at most head_dim / 2)


def shapes() -> dict[str, tuple[int, ...]]:
    """GGUF tensor names -> numpy shapes of the benchmark model."""
    out = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": (HIDDEN,), b + "ffn_norm.weight": (HIDDEN,),
                    b + "attn_q.bias": (HIDDEN,), b + "attn_k.bias": (KV_HEADS * HEAD_DIM,),
                    b + "attn_v.bias": (KV_HEADS * HEAD_DIM,),
                    b + "attn_q.weight": (HIDDEN, HIDDEN), b + "attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                    b + "attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), b + "attn_output.weight": (HIDDEN, HIDDEN),
                    b + "ffn_gate.weight": (FFN, HIDDEN), b + "ffn_up.weight": (FFN, HIDDEN),
                    b + "ffn_down.weight": (HIDDEN, FFN)})
    return out


def model_writer(path: Path, tensors: dict[str, tuple[int, ...]], arch: str) -> gguf.GGUFWriter:
    """A writer of the benchmark model's metadata and tokenizer, header written, tensors to come."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name(path.stem.split(".")[0])
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "qwen2vl":
        w.add_rope_dimension_sections(MROPE_SECTIONS)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([f"m{i} n{i}" for i in range(N_MERGES)])
    for name, shape in tensors.items():
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def build_inputs(folder: Path) -> tuple[list[Path], list[Path]]:
    """base.gguf, vlm.gguf, code.gguf (F16), written together tensor by tensor; and the same
    three with only a 4-row embedding (header-base.gguf, ...), to time what a merge costs
    whatever the size of the tensors."""
    paths = [folder / f"{n}.gguf" for n in ("base", "vlm", "code")]
    headers = [folder / f"header-{n}.gguf" for n in ("base", "vlm", "code")]
    if all(p.is_file() and gguf_file.scan_gguf(p).value("general.architecture") == ARCHS[p.stem.split("-")[-1]]
           for p in paths + headers):
        return paths, headers
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(headers):
        w = model_writer(p, {"token_embd.weight": (4, HIDDEN)}, ARCHS[p.stem.split("-")[-1]])
        w.write_tensor_data(np.full((4, HIDDEN), i, np.float16))
        w.close()
    rng = np.random.default_rng(0)
    writers = [model_writer(p.with_suffix(".tmp"), shapes(), ARCHS[p.stem]) for p in paths]
    for name, shape in shapes().items():
        dtype = np.float32 if len(shape) == 1 else np.float16
        base = rng.standard_normal(shape, np.float32) * 0.02
        writers[0].write_tensor_data(base.astype(dtype))
        for w in writers[1:]:
            tuned = rng.standard_normal(shape, np.float32) * 0.002
            tuned += base
            w.write_tensor_data(tuned.astype(dtype))
        del base
    for w, p in zip(writers, paths):
        w.close()
        os.replace(p.with_suffix(".tmp"), p)
    return paths, headers


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command, started with no dirty pages pending."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return elapsed, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_inputs(WORK)
        return
    # built in a child: a child's peak RSS (wait4) counts the memory of the process it was forked
    # from, so this one stays small
    subprocess.run([sys.executable, __file__, "--build"], check=True)
    inputs, headers = build_inputs(WORK)
    size = sum(p.stat().st_size for p in inputs)
    largest = max(int(np.prod(s)) for s in shapes().values())
    configs = {}
    for name, (base, vlm, code) in (("merge", inputs), ("headers", headers)):
        configs[name] = WORK / f"{name}.yaml"
        configs[name].write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": str(base),
                                             "models": [{"model": str(vlm), "parameters": {"weight": 0.7}},
                                                        {"model": str(code), "parameters": {"weight": 0.5}}],
                                             "metadata_source": str(vlm)}))
    warm(inputs + headers)
    copies = WORK / "copies"
    results = {"input_bytes": size, "largest_tensor_f32_bytes": largest * 4, "runs": {}}
    best = None
    for _ in range(args.repeat):
        shutil.rmtree(copies, ignore_errors=True)
        copies.mkdir()
        seconds, rss = timed(["cp", *map(str, inputs), str(copies)])
        best = min(best or seconds, seconds)
    shutil.rmtree(copies)
    results["runs"]["cp"] = {"seconds": best, "GB/s": size / best / 1e9}
    ggraft = str(Path(sys.executable).with_name("ggraft"))
    for label, config, outtype in (("merge f16", "merge", "f16"), ("merge q8_0", "merge", "q8_0"),
                                   ("merge f16, headers only", "headers", "f16")):
        out = WORK / "merged.gguf"
        runs = []
        for _ in range(args.repeat):
            out.unlink(missing_ok=True)  # as cp writes new files: no old file to drop inside the timing
            runs.append(timed([ggraft, "merge", str(configs[config]), "-o", str(out), "--outtype", outtype]))
        seconds, rss = min(runs)
        results["runs"][label] = {"seconds": seconds, "peak_rss_MB": max(r for _, r in runs) / 1e6}
        if config == "merge":
            results["runs"][label].update({"GB/s": size / seconds / 1e9, "vs_cp": best / seconds})
        out.unlink()
    fixed = results["runs"]["merge f16, headers only"]["seconds"]
    stream = results["runs"]["merge f16"]["seconds"] - fixed
    results["tensor_stream_f16"] = {"seconds": stream, "GB/s": size / stream / 1e9, "vs_cp": best / stream}
    (WORK / "results.json").write_text(json.dumps(results, indent=2))
    print(f"inputs: 3 x {size / 3 / 1e9:.2f} GB F16 with a {VOCAB}-token tokenizer, architectures "
          f"{', '.join(ARCHS.values())} (metadata_source: the qwen2vl one) "
          f"(largest tensor {largest * 4 / 1e6:.0f} MB as f32); best of {args.repeat}\n")
    print("| run | seconds | input GB/s | vs cp | peak RSS |")
    print("|---|---|---|---|---|")
    for name, r in results["runs"].items():
        rss = f"{r['peak_rss_MB']:.0f} MB" if "peak_rss_MB" in r else "-"
        rate = f"{r['GB/s']:.2f}" if "GB/s" in r else "-"
        ratio = f"{r['vs_cp']:.2f}x" if "vs_cp" in r else ("1x" if name == "cp" else "-")
        print(f"| {name} | {r['seconds']:.2f} | {rate} | {ratio} | {rss} |")
    t = results["tensor_stream_f16"]
    print(f"\ntensor stream (merge f16 minus headers only): {t['seconds']:.2f} s, {t['GB/s']:.2f} GB/s, "
          f"{t['vs_cp']:.2f}x cp")


if __name__ == "__main__":
    main()
