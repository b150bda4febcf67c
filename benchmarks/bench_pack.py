"""Time ``ggraft pack`` on a pair with a Mistral-Small-size vocabulary (131k tokens, 269k merges).

The text GGUF (no blocks: the embedding and output tables only, sparse) and the Pixtral mmproj come
from ``bench_check``'s builders.  Pack reads both through the validated header index, runs the
pair check, hard-links the files and hashes them for the package's checksums; the hashing reads
every byte, so the rest is also timed alone (hashing replaced by a no-op): that header-only part's
goal is well under a second whatever the vocabulary.

    .venv/bin/python benchmarks/bench_pack.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_check  # noqa: E402

WORK = ROOT / "benchmarks" / ".work" / "pack"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import ggraft.jobs.pack as packing

    WORK.mkdir(parents=True, exist_ok=True)
    text, mmproj, out = WORK / "text.gguf", WORK / "mmproj.gguf", WORK / "out"
    if not text.exists() or not mmproj.exists():
        bench_check.build_mmproj(mmproj, bench_check.build_text(text, blocks=0))
    def timed() -> list[float]:
        runs = []
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            packing.pack(text, mmproj, "ollama", out, link="link")
            runs.append(time.perf_counter() - start)
        return runs

    whole = timed()
    packing.sha256 = lambda path: "-"  # the header-only part: everything but reading the data to hash it
    header = timed()
    size = (text.stat().st_size + mmproj.stat().st_size) / 1e9
    print(f"pack --ollama, {bench_check.VOCAB} tokens, {size:.2f} GB of GGUF (best of {args.repeat}, median):")
    print(f"  whole pack        {min(whole):.3f} s  {statistics.median(whole):.3f} s")
    print(f"  header-only part  {min(header):.3f} s  {statistics.median(header):.3f} s (goal: well under 1 s)")


if __name__ == "__main__":
    main()
