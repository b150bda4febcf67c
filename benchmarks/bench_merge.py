"""Benchmark ``ggraft merge`` on three ~1 GB GGUF text models against ``cp`` of the same bytes.

The inputs are built once under ``benchmarks/.work/merge`` (outside git): llama-architecture
models with Qwen2.5-0.5B's shapes (hidden 896, 24 layers, FFN 4864, vocabulary 151936, tied
output) and a tokenizer of its size (151936 tokens, 151387 merges, which the merge copies),
F16, random weights: a base and two "fine-tunes" (base + noise).  Then, with the page cache
warm:

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

from ggraft import gguf_file

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work" / "merge"
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 896, 4864, 24, 14, 2, 151936
HEAD_DIM = HIDDEN // HEADS
N_MERGES = 151387


def shapes() -> dict[str, tuple[int, ...]]:
    """GGUF tensor names -> numpy shapes of the benchmark model."""
    out = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": (HIDDEN,), b + "ffn_norm.weight": (HIDDEN,),
                    b + "attn_q.weight": (HIDDEN, HIDDEN), b + "attn_k.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                    b + "attn_v.weight": (KV_HEADS * HEAD_DIM, HIDDEN), b + "attn_output.weight": (HIDDEN, HIDDEN),
                    b + "ffn_gate.weight": (FFN, HIDDEN), b + "ffn_up.weight": (FFN, HIDDEN),
                    b + "ffn_down.weight": (HIDDEN, FFN)})
    return out


def build_inputs(folder: Path) -> list[Path]:
    """base.gguf, vlm.gguf, code.gguf (F16), written together tensor by tensor."""
    paths = [folder / f"{n}.gguf" for n in ("base", "vlm", "code")]
    if all(p.is_file() and "tokenizer.ggml.merges" in gguf_file.scan_gguf(p).fields for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writers = []
    for p in paths:
        w = gguf.GGUFWriter(p.with_suffix(".tmp"), "llama")
        w.add_name(p.stem)
        w.add_context_length(4096)
        w.add_embedding_length(HIDDEN)
        w.add_block_count(LAYERS)
        w.add_feed_forward_length(FFN)
        w.add_head_count(HEADS)
        w.add_head_count_kv(KV_HEADS)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(VOCAB)])
        w.add_token_types([1] * VOCAB)
        w.add_token_merges([f"m{i} n{i}" for i in range(N_MERGES)])
        for name, shape in shapes().items():
            dtype = np.float32 if len(shape) == 1 else np.float16
            w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        writers.append(w)
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
    return paths


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
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build_inputs(WORK)
        return
    # built in a child: a child's peak RSS (wait4) counts the memory of the process it was forked
    # from, so this one stays small
    subprocess.run([sys.executable, __file__, "--build"], check=True)
    inputs = build_inputs(WORK)
    size = sum(p.stat().st_size for p in inputs)
    largest = max(int(np.prod(s)) for s in shapes().values())
    config = WORK / "merge.yaml"
    config.write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": str(inputs[0]),
                                  "models": [{"model": str(inputs[1]), "parameters": {"weight": 0.7}},
                                             {"model": str(inputs[2]), "parameters": {"weight": 0.5}}]}))
    warm(inputs)
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
    for outtype in ("f16", "q8_0"):
        out = WORK / f"merged-{outtype}.gguf"
        runs = []
        for _ in range(args.repeat):
            out.unlink(missing_ok=True)  # as cp writes new files: no old file to drop inside the timing
            runs.append(timed([ggraft, "merge", str(config), "-o", str(out), "--outtype", outtype]))
        seconds, rss = min(runs)
        results["runs"][f"merge {outtype}"] = {"seconds": seconds, "GB/s": size / seconds / 1e9,
                                               "vs_cp": best / seconds, "peak_rss_MB": max(r for _, r in runs) / 1e6}
        out.unlink()
    (WORK / "results.json").write_text(json.dumps(results, indent=2))
    print(f"inputs: 3 x {size / 3 / 1e9:.2f} GB F16 (largest tensor {largest * 4 / 1e6:.0f} MB as f32)\n")
    print("| run | seconds | input GB/s | vs cp | peak RSS |")
    print("|---|---|---|---|---|")
    for name, r in results["runs"].items():
        rss = f"{r['peak_rss_MB']:.0f} MB" if "peak_rss_MB" in r else "-"
        ratio = f"{r['vs_cp']:.2f}x" if "vs_cp" in r else "1x"
        print(f"| {name} | {r['seconds']:.2f} | {r['GB/s']:.2f} | {ratio} | {rss} |")


if __name__ == "__main__":
    main()
