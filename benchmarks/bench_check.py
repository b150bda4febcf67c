"""Time ``ggraft check`` on a multi-GB pair: a Mistral-Small-sized text GGUF and a Pixtral mmproj.

The files are written with gguf-py's GGUFWriter (header, keys, tensor infos) and their data
section is extended as a sparse file, so they take gigabytes of address space but little disk;
the [IMG_BREAK] embedding row is written for real so check compares actual values.  The vocab is
full size (131072 tokens, 269k BPE merges), which is what a header reader has to walk.

    .venv/bin/python benchmarks/bench_check.py [--blocks 12] [--compare-reader]

Goal: check < 0.3 s (the library call; the CLI adds Python start-up and imports).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / ".work"
Q = gguf.GGMLQuantizationType
WIDTH, FFN, N_KV, VOCAB, MERGES = 5120, 32768, 1024, 131072, 269_000
IMG_BREAK_ID = 12
SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}[IMG]{% endif %}{% endfor %}{% endif %}[/INST]"
            "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def tensor_info(w: gguf.GGUFWriter, name: str, shape: tuple[int, ...], qtype: Q) -> None:
    """Register a tensor by numpy shape and type, without data."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = int(np.prod(shape)) // block * size
    if qtype in (Q.F32, Q.F16):
        w.add_tensor_info(name, shape, np.dtype(np.float32 if qtype == Q.F32 else np.float16), nbytes)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)


def finish_sparse(w: gguf.GGUFWriter, path: Path) -> None:
    """Write header, keys and tensor infos; extend the data section as a hole."""
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    from ggraft.gguf_io.gguf_file import scan_gguf  # noqa: E402  (the layout gguf-py would have written)

    size = path.stat().st_size
    data_start = size + (-size) % w.data_alignment
    total = sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, w.data_alignment) for ti in w.tensors[0].values())
    os.truncate(path, data_start + total)
    scan_gguf(path).close()


def build_text(path: Path, blocks: int) -> np.ndarray:
    w = gguf.GGUFWriter(None, "llama")
    w.add_name("bench-mistral-small-like")
    w.add_context_length(131072)
    w.add_embedding_length(WIDTH)
    w.add_block_count(blocks)
    w.add_feed_forward_length(FFN)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("tekken")
    tokens = SPECIALS + [f"tok{i}" for i in range(VOCAB - len(SPECIALS))]
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)))
    w.add_token_merges([f"t{i} o{i}" for i in range(MERGES)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    tensor_info(w, "token_embd.weight", (VOCAB, WIDTH), Q.F16)
    for b in range(blocks):
        for name, shape in (("attn_q", (WIDTH, WIDTH)), ("attn_k", (N_KV, WIDTH)), ("attn_v", (N_KV, WIDTH)),
                            ("attn_output", (WIDTH, WIDTH)), ("ffn_gate", (FFN, WIDTH)), ("ffn_up", (FFN, WIDTH)),
                            ("ffn_down", (WIDTH, FFN))):
            tensor_info(w, f"blk.{b}.{name}.weight", shape, Q.Q8_0)
        tensor_info(w, f"blk.{b}.attn_norm.weight", (WIDTH,), Q.F32)
        tensor_info(w, f"blk.{b}.ffn_norm.weight", (WIDTH,), Q.F32)
    tensor_info(w, "output_norm.weight", (WIDTH,), Q.F32)
    tensor_info(w, "output.weight", (VOCAB, WIDTH), Q.Q8_0)
    finish_sparse(w, path)
    from ggraft.gguf_io.gguf_file import scan_gguf

    row = np.random.default_rng(0).standard_normal(WIDTH).astype(np.float16)
    index = scan_gguf(path)
    embd = index.tensor("token_embd.weight")
    index.close()
    with open(path, "r+b") as f:
        f.seek(embd.offset + IMG_BREAK_ID * WIDTH * 2)
        f.write(row.tobytes())
    return row.astype(np.float32)


def build_mmproj(path: Path, img_break: np.ndarray) -> None:
    w = gguf.GGUFWriter(None, "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.PIXTRAL)
    w.add_vision_image_size(1540)
    w.add_vision_patch_size(14)
    w.add_vision_embedding_length(1024)
    w.add_vision_feed_forward_length(4096)
    w.add_vision_block_count(24)
    w.add_vision_head_count(16)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_projection_dim(WIDTH)
    w.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])
    w.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])
    tensor_info(w, "v.patch_embd.weight", (1024, 3, 14, 14), Q.F16)
    for b in range(24):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensor_info(w, f"v.blk.{b}.{name}.weight", (1024, 1024), Q.F16)
        for name, shape in (("ffn_gate", (4096, 1024)), ("ffn_up", (4096, 1024)), ("ffn_down", (1024, 4096))):
            tensor_info(w, f"v.blk.{b}.{name}.weight", shape, Q.F16)
        tensor_info(w, f"v.blk.{b}.ln1.weight", (1024,), Q.F32)
        tensor_info(w, f"v.blk.{b}.ln2.weight", (1024,), Q.F32)
    tensor_info(w, "mm.1.weight", (WIDTH, 1024), Q.F16)
    tensor_info(w, "mm.2.weight", (WIDTH, WIDTH), Q.F16)
    tensor_info(w, "v.token_embd.img_break", (WIDTH,), Q.F32)
    finish_sparse(w, path)
    from ggraft.gguf_io.gguf_file import scan_gguf

    index = scan_gguf(path)
    t = index.tensor("v.token_embd.img_break")
    index.close()
    with open(path, "r+b") as f:
        f.seek(t.offset)
        f.write(img_break.astype(np.float32).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12, help="text blocks (12: ~8.6 GB)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--compare-reader", action="store_true", help="also time gguf-py's GGUFReader (slow)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    text, mmproj = WORK / f"text-{args.blocks}blk.gguf", WORK / "mmproj-pixtral.gguf"
    if not text.exists() or not mmproj.exists():
        t0 = time.perf_counter()
        build_mmproj(mmproj, build_text(text, args.blocks))
        print(f"built in {time.perf_counter() - t0:.1f} s")
    print(f"text   {text.stat().st_size / 2**30:.2f} GiB ({VOCAB} tokens, {MERGES} merges)")
    print(f"mmproj {mmproj.stat().st_size / 2**30:.2f} GiB (pixtral)")

    cold = subprocess.run([sys.executable, "-c", (
        "import time,sys; t=time.perf_counter(); from ggraft.pair.check import check_pair; t1=time.perf_counter(); "
        f"r=check_pair({str(text)!r},{str(mmproj)!r}); t2=time.perf_counter(); "
        "print(f'{t1-t:.3f} {t2-t1:.3f} {r.ok}')")], capture_output=True, text=True, cwd=ROOT, check=True)
    imports, first, ok = cold.stdout.split()
    print(f"first check in a fresh process: {float(first):.3f} s (imports {float(imports):.3f} s), ok={ok}")

    from ggraft.pair.check import check_pair

    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        report = check_pair(text, mmproj)
        times.append(time.perf_counter() - t0)
    assert report.ok, report.findings
    print(f"check_pair: median {statistics.median(times):.3f} s, min {min(times):.3f} s over {args.repeat} runs "
          f"(findings: {', '.join(f.code for f in report.findings)})")

    exe = Path(sys.executable).with_name("ggraft")
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([str(exe), "check", str(text), str(mmproj), "--json"], capture_output=True, check=True)
        walls.append(time.perf_counter() - t0)
    print(f"`ggraft check` wall clock (process start, imports, check, JSON): median {statistics.median(walls):.3f} s")

    if args.compare_reader:
        t0 = time.perf_counter()
        gguf.GGUFReader(text)
        print(f"gguf-py GGUFReader on the text GGUF alone: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
