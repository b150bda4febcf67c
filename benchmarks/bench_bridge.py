"""Benchmark ``ggraft bridge`` between two text models with 150k+ token vocabularies.

The inputs are built once under ``benchmarks/.work/bridge`` (outside git), with gguf-py:

- the donor's text model: Qwen2.5-0.5B's vocabulary size and width (151936 tokens x 896),
  byte-level BPE pieces (``Ġword``), F16 table;
- the recipient: Gemma 3 270M's (262144 tokens x 640), SentencePiece pieces (``▁word``), Q8_0
  table, architecture ``gemma3`` (whose token embeddings llama.cpp scales by sqrt(640));
- 80000 pieces in common (40000 words, with and without a leading space), whose rows follow a
  planted linear map plus noise; every other row is unrelated;
- the donor mmproj: a tiny random LLaVA (CLIP tower 64 wide) projecting to 896, converted by ggraft.

Then ``ggraft bridge --json`` runs ``--repeat`` times in a subprocess: wall time and peak RSS
(``wait4``), against the memory budget of the two embedding tables as float32 plus 256 MiB, and
beside the peak RSS of a process that only imports ggraft's bridge (the constant part).

Run: ``.venv/bin/python benchmarks/bench_bridge.py`` (not part of the tests; needs the dev extras
to build the tiny LLaVA once).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fixtures package

WORK = ROOT / "benchmarks" / ".work" / "bridge"
DONOR_VOCAB, DONOR_WIDTH = 151936, 896
RECIPIENT_VOCAB, RECIPIENT_WIDTH = 262144, 640
SHARED_WORDS = 40000
N_SPECIAL = 32
BUDGET_CONSTANT = 256 << 20


def word_list(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct seeded lowercase words of 3 to 6 letters (distinct numbers in base 26)."""
    numbers = np.random.default_rng(seed).choice(26 ** 6 - 26 ** 2, n, replace=False) + 26 ** 2
    out = []
    for x in numbers.tolist():
        letters = []
        while x:
            x, r = divmod(x, 26)
            letters.append(chr(97 + r))
        out.append("".join(reversed(letters)))
    return out


def vocab(kind: str, size: int, words: list[str]) -> tuple[list[str], list[int], list[str | None]]:
    """(pieces, token types, the text of each word piece) of ``size`` tokens."""
    from fixtures.bridge import BYTE_ALPHABET

    if kind == "bpe":
        pieces = [f"<|special_{i}|>" for i in range(N_SPECIAL)] + [BYTE_ALPHABET[b] for b in range(256)]
        types, space = [3] * N_SPECIAL + [1] * 256, BYTE_ALPHABET[ord(" ")]
    else:
        pieces = ["<unk>", "<s>", "</s>", *(f"<special_{i}>" for i in range(N_SPECIAL)),
                  *(f"<0x{b:02X}>" for b in range(256))]
        types, space = [2, 3, 3] + [3] * N_SPECIAL + [6] * 256, "▁"
    texts: list[str | None] = [None] * len(pieces)
    for w in words:
        if len(pieces) + 2 > size:
            break
        pieces += [space + w, w]
        types += [1, 1]
        texts += [" " + w, w]
    return pieces, types, texts


def write_text(path: Path, arch: str, kind: str, pieces: list[str], types: list[int], table: np.ndarray,
               qtype: gguf.GGMLQuantizationType) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    w.add_context_length(4096)
    w.add_embedding_length(table.shape[1])
    w.add_block_count(1)
    w.add_feed_forward_length(2 * table.shape[1])
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == gguf.GGMLQuantizationType.F16
                    else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2" if kind == "bpe" else "llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_types(types)
    if kind == "bpe":
        w.add_token_merges(["Ġ a"])
    else:
        w.add_token_scores([0.0] * len(pieces))
    w.add_tensor("token_embd.weight", gguf.quants.quantize(table, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_texts(folder: Path) -> None:
    rng = np.random.default_rng(0)
    n_donor_words = (DONOR_VOCAB - N_SPECIAL - 256) // 2
    n_recipient_words = (RECIPIENT_VOCAB - N_SPECIAL - 259) // 2
    words = word_list(n_donor_words + n_recipient_words - SHARED_WORDS)
    donor = vocab("bpe", DONOR_VOCAB, words[:n_donor_words])
    recipient = vocab("spm", RECIPIENT_VOCAB, words[n_donor_words - SHARED_WORDS:])
    x = np.zeros((DONOR_VOCAB, DONOR_WIDTH), np.float32)
    x[:len(donor[0])] = rng.standard_normal((len(donor[0]), DONOR_WIDTH), np.float32) * 0.02
    pad = DONOR_VOCAB - len(donor[0])
    write_text(folder / "donor-text.gguf", "qwen2", "bpe", donor[0] + [f"<pad_{i}>" for i in range(pad)],
               donor[1] + [5] * pad, x, gguf.GGMLQuantizationType.F16)
    # rows of std ~0.8, as Gemma 3's stored rows times sqrt(640)
    a = rng.normal(0, 1 / np.sqrt(DONOR_WIDTH), (RECIPIENT_WIDTH, DONOR_WIDTH)) * 40
    c = rng.normal(0, 0.1, RECIPIENT_WIDTH)
    y = rng.standard_normal((RECIPIENT_VOCAB, RECIPIENT_WIDTH), np.float32) * 0.8
    donor_ids = {t: i for i, t in enumerate(donor[2]) if t is not None}
    rows = [(j, donor_ids[t]) for j, t in enumerate(recipient[2]) if t in donor_ids]
    mine, theirs = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    y[mine] = x[theirs] @ a.T + c + rng.standard_normal((len(rows), RECIPIENT_WIDTH), np.float32) * 0.3
    y /= np.sqrt(RECIPIENT_WIDTH)  # gemma3 stores rows llama.cpp multiplies by sqrt(width)
    pad = RECIPIENT_VOCAB - len(recipient[0])
    write_text(folder / "recipient-text.gguf", "gemma3", "spm", recipient[0] + [f"<pad_{i}>" for i in range(pad)],
               recipient[1] + [5] * pad, y, gguf.GGMLQuantizationType.Q8_0)


def build_mmproj(folder: Path) -> None:
    """A tiny random LLaVA projecting to the donor's width, converted to an f32 mmproj."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from fixtures import common
    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.mmproj.converter import converter_for
    from ggraft.mmproj.writer import convert

    common.seeded(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=56, patch_size=14),
                      text_config=LlamaConfig(hidden_size=DONOR_WIDTH, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, num_key_value_heads=1, vocab_size=300),
                      image_token_index=299, vision_feature_layer=-2, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(cfg).save_pretrained(folder / "llava-hf")
    convert(converter_for(Checkpoint(folder / "llava-hf")), folder / "donor-mmproj.gguf", "f32", force=True)


def build() -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    if not (WORK / "recipient-text.gguf").exists():
        print("building the two text models (once) ...", flush=True)
        build_texts(WORK)
    if not (WORK / "donor-mmproj.gguf").exists():
        print("building the donor mmproj (once) ...", flush=True)
        build_mmproj(WORK)
    return WORK


def timed(args: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of a subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{args[1:3]} failed: {err}")
    return wall, usage.ru_maxrss * 1024, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build()
        return
    # built in a child: a process forked from a big parent starts with the parent's RSS as its peak
    subprocess.run([sys.executable, __file__, "--build-only"], check=True)
    folder = WORK
    exe = str(Path(sys.executable).with_name("ggraft"))
    out = folder / "bridged.gguf"
    command = [exe, "bridge", "--mmproj", str(folder / "donor-mmproj.gguf"),
               "--donor-text", str(folder / "donor-text.gguf"), "--text", str(folder / "recipient-text.gguf"),
               "-o", str(out), "--force", "--json"]
    tables = (DONOR_VOCAB * DONOR_WIDTH + RECIPIENT_VOCAB * RECIPIENT_WIDTH) * 4
    _, imports_rss, _ = timed([sys.executable, "-c", "import ggraft.jobs.bridge, ggraft.cli.bridge_cmd"])
    print(f"donor    {DONOR_VOCAB} tokens x {DONOR_WIDTH} (F16, byte-level BPE); "
          f"recipient {RECIPIENT_VOCAB} tokens x {RECIPIENT_WIDTH} (Q8_0, SentencePiece, gemma3)")
    walls, peaks, report = [], [], {}
    for rep in range(args.repeat):
        wall, peak, stdout = timed(command)
        report = json.loads(stdout)
        walls.append(wall)
        peaks.append(peak)
        print(f"  rep {rep + 1}: {wall:.2f} s, peak RSS {peak / 2**20:.0f} MiB", flush=True)
    fit = report["fit"]
    print(f"fit: {fit['shared']} shared tokens, {fit['held_out']} held out, top-1 {fit['top1']:.1%}, "
          f"mean cosine {fit['mean_cosine']:.3f} (baseline {fit['baseline_cosine']:.3f}), ridge {fit['ridge']:g}")
    print(f"ggraft bridge: median {statistics.median(walls):.2f} s, min {min(walls):.2f} s over {args.repeat} runs")
    print(f"peak RSS {max(peaks) / 2**20:.0f} MiB vs budget {(tables + BUDGET_CONSTANT) / 2**20:.0f} MiB "
          f"(both tables as float32: {tables / 2**20:.0f} MiB, + 256 MiB); a process that only imports "
          f"the bridge: {imports_rss / 2**20:.0f} MiB")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (2 cores)")
    out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
