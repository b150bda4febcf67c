"""ggraft run TEXT.gguf MMPROJ.gguf --image FILE [--image FILE ...] -p PROMPT"""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from . import output
from .options import ExtraBufts, Json, MmprojGguf, TextGguf, Threads


def run(text: TextGguf, mmproj: MmprojGguf,
        image: Annotated[list[str], typer.Option("--image", metavar="FILE", help="Image file (PNG, JPEG, WebP); repeatable.")],
        prompt: Annotated[str, typer.Option("-p", "--prompt", metavar="TEXT",
                                            help="What to ask. Images go where it says <__media__>, else first.")],
        system: Annotated[Optional[str], typer.Option("--system", metavar="TEXT", help="System message.")] = None,
        max_tokens: Annotated[int, typer.Option("--max-tokens", metavar="N", min=1, help="Most tokens to generate.")] = 128,
        temp: Annotated[float, typer.Option("--temp", metavar="T", min=0.0, help="Sampling temperature (0: greedy).")] = 0.2,
        top_p: Annotated[float, typer.Option("--top-p", metavar="P", min=0.0, max=1.0, help="Nucleus sampling: keep the likeliest tokens up to this probability.")] = 0.95,
        seed: Annotated[int, typer.Option("--seed", metavar="N", help="Sampling seed (same seed, same output).")] = 0,
        ctx: Annotated[int, typer.Option("--ctx", metavar="N", min=64, help="Context size in tokens.")] = 4096,
        threads: Threads = None,
        n_gpu_layers: Annotated[int, typer.Option("--n-gpu-layers", metavar="N", help="Layers on Metal/CUDA when built with them (-1: all).")] = 0,
        mmproj_cpu: Annotated[bool, typer.Option("--mmproj-cpu", help="Keep the vision encoder on the CPU.")] = False,
        raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
        extra_bufts: ExtraBufts = None,
        json_out: Json = False,
        ) -> None:
    """Answer a prompt about one or more images with a text model + mmproj pair.

    The pair is checked first; the reply streams to stdout (--json: the whole reply with timings)."""
    from ggraft.errors import InputError
    from ggraft.pair.messages import user_messages
    from ggraft.pair.runtime import Pair

    if raw and system:
        raise InputError("--system has no place in a --raw prompt", "write the system text into the prompt")
    messages = user_messages(image, prompt, system)  # reads and checks the images before loading anything
    pair = Pair(text, mmproj, n_ctx=ctx, n_threads=threads, n_gpu_layers=n_gpu_layers,
                mmproj_cpu=mmproj_cpu, seed=seed, raw=raw, extra_bufts=extra_bufts)
    for warning in pair.warnings:
        output.note(f"Warning: {warning}")
    reply = pair.generate(messages, stream=not json_out, max_tokens=max_tokens, temperature=temp,
                          top_p=top_p, seed=seed)
    if json_out:
        reply.read()
        output.emit_json({"text": reply.text, "finish_reason": reply.finish_reason,
                          "text_model": str(text), "mmproj": str(mmproj), "images": [str(p) for p in image],
                          "template": pair.template, "seed": seed, "warnings": pair.warnings,
                          "timings": {"load_ms": round(pair.load_ms, 3)} | reply.timings.to_dict()})
        return
    for piece in reply:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
