"""`ggraft run` vs bare llama-cpp-python on the same pair, image and prompt.

One request = image file -> image encode + prompt + 32 generated tokens, timed from the image
file to the whole reply, with the model already loaded:

  * bare:   Llama(chat_handler=MTMDChatHandler(mmproj)).create_chat_completion(...) with the image
            as a data: URI, as llama-cpp-python's documentation shows;
  * ggraft: what `ggraft run` does per request: user_messages() (reads and checks the image) and
            Pair.generate(), non-streaming as with --json and streaming as without it.

Runs alternate (bare, ggraft, bare again, ...) after a warm-up; medians of wall times of --reps
runs each; overhead = ggraft / bare - 1 (goal: <= 5%), and the same figure for bare against itself
shows how much of a difference is noise.  The process as a whole (start, check, load, one request)
is also timed: `ggraft run --json` vs the bare script in a fresh interpreter.

    python benchmarks/bench_run.py                      # the tiny LLaVA fixture (built once, cached)
    python benchmarks/bench_run.py --text T.gguf --mmproj M.gguf --image cat.jpg [--reps 15] [--json]
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "Describe the picture in detail."
TOKENS = 32

BARE_SCRIPT = """
import base64, sys
from llama_cpp.llama_chat_format import MTMDChatHandler
from ggraft.pair.engine import open_llama  # llama_cpp.Llama, with extra buffer types off on AMX (crash)
text, mmproj, image, prompt, tokens, threads = sys.argv[1:]
llama = open_llama(text, chat_handler=MTMDChatHandler(mmproj, verbose=False), n_ctx=4096,
                   n_threads=int(threads), seed=0, verbose=False)
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
r = llama.create_chat_completion(messages=[{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}],
    max_tokens=int(tokens), temperature=0.2, top_p=0.95, seed=0)
print(r["choices"][0]["message"]["content"])
"""


def tiny_pair() -> tuple[Path, Path, Path]:
    from fixtures import llava
    from ggraft.mmproj import writer as mmproj
    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.mmproj.converter import converter_for

    fixture = llava.build()
    out = ROOT / ".cache" / "bench" / f"mmproj-{fixture.name}-f32.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        mmproj.convert(converter_for(Checkpoint(fixture / "hf")), out, "f32")
    return fixture / "text.gguf", out, ROOT / "fixtures" / "sample.png"


def bare_request(llama, image: Path, stream: bool) -> int:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": PROMPT}]}]
    result = llama.create_chat_completion(messages=messages, max_tokens=TOKENS, temperature=0.2, top_p=0.95,
                                          seed=0, stream=stream)
    if stream:
        return len("".join(c["choices"][0]["delta"].get("content") or "" for c in result))
    return result["usage"]["completion_tokens"]


def ggraft_request(pair, image: Path, stream: bool) -> int:
    from ggraft.pair.messages import user_messages

    reply = pair.generate(user_messages([image], PROMPT), stream=stream, max_tokens=TOKENS, temperature=0.2,
                          top_p=0.95, seed=0)
    reply.read()
    return reply.timings.generated_tokens


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) * 1000


def compare(times: dict[str, list[float]]) -> dict:
    """Medians; ``overhead_pct`` = ggraft / bare - 1; ``noise_pct`` = the same for bare against itself."""
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"bare_ms": round(med["bare"], 2), "ggraft_ms": round(med["ggraft"], 2),
            "overhead_pct": round((med["ggraft"] / med["bare"] - 1) * 100, 1),
            "noise_pct": round((med["bare again"] / med["bare"] - 1) * 100, 1)}


def per_request(text: Path, mmproj: Path, image: Path, reps: int, threads: int) -> dict:
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from ggraft.pair.engine import open_llama
    from ggraft.pair.messages import user_messages
    from ggraft.pair.runtime import Pair

    bare = open_llama(text, chat_handler=MTMDChatHandler(str(mmproj), verbose=False), n_ctx=4096,
                      n_threads=threads, seed=0, verbose=False)
    pair = Pair(text, mmproj, n_ctx=4096, n_threads=threads, seed=0)
    sides = {"bare": (bare_request, bare), "ggraft": (ggraft_request, pair), "bare again": (bare_request, bare)}
    out = {}
    for stream in (False, True):
        assert bare_request(bare, image, False) == TOKENS, "the model stopped before 32 tokens; pick another prompt"
        assert ggraft_request(pair, image, False) == TOKENS
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(reps):
            for name, (request, model) in sides.items():
                times[name].append(timed(request, model, image, stream))
        out["stream" if stream else "whole"] = compare(times)
    reply = pair.generate(user_messages([image], PROMPT), max_tokens=TOKENS, seed=0, stream=False)
    reply.read()
    out["ggraft_timings"] = reply.timings.to_dict()
    return out


def per_process(text: Path, mmproj: Path, image: Path, reps: int, threads: int) -> dict:
    exe = Path(sys.executable).with_name("ggraft")
    bare = [sys.executable, "-c", BARE_SCRIPT, str(text), str(mmproj), str(image), PROMPT, str(TOKENS), str(threads)]
    commands = {"bare": bare, "ggraft": [str(exe), "run", str(text), str(mmproj), "--image", str(image), "-p", PROMPT,
                                         "--json", "--max-tokens", str(TOKENS), "--threads", str(threads)],
                "bare again": bare}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(reps):
        for name, cmd in commands.items():
            times[name].append(timed(lambda: subprocess.run(cmd, check=True, capture_output=True)))
    return compare(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path)
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--reps", type=int, default=51, help="runs of each side per request mode")
    ap.add_argument("--process-reps", type=int, default=5, help="runs of each whole process")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: steadiest on a shared machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.text and args.mmproj:
        text, mmproj, image = args.text, args.mmproj, args.image or ROOT / "fixtures" / "sample.png"
    else:
        text, mmproj, image = tiny_pair()
    results = {"pair": {"text": str(text), "mmproj": str(mmproj), "image": str(image)}, "tokens": TOKENS,
               "reps": args.reps, "threads": args.threads,
               "request": per_request(text, mmproj, image, args.reps, args.threads),
               "process": per_process(text, mmproj, image, args.process_reps, args.threads)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    r, p = results["request"], results["process"]
    print(f"pair: {text.name} + {mmproj.name}, image {image.name}, {TOKENS} tokens, {args.threads} thread(s), "
          f"medians of {args.reps} (requests) / {args.process_reps} (processes)\n")
    print("| measured (wall time, medians) | bare llama-cpp-python | ggraft | overhead | noise (bare vs bare) |")
    print("|---|---|---|---|---|")
    for label, m in (("request: whole reply (`run --json`)", r["whole"]), ("request: streamed (`run`)", r["stream"]),
                     ("process: start + check + load + request", p)):
        print(f"| {label} | {m['bare_ms']} ms | {m['ggraft_ms']} ms | {m['overhead_pct']:+}% | {m['noise_pct']:+}% |")
    t = r["ggraft_timings"]
    print(f"\nggraft's timings for one request: image encode {t['image_encode_ms']} ms, prompt {t['prompt_ms']} ms, "
          f"{t['generated_tokens']} tokens at {t['tokens_per_s']} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
