"""ggraft run TEXT.gguf MMPROJ.gguf --image FILE -p PROMPT"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import MmprojGguf, TextGguf, Threads


def register(app: typer.Typer) -> None:
    @app.command()
    def run(text: TextGguf, mmproj: MmprojGguf,
            image: Annotated[list[Path], typer.Option("--image", help="Image file (PNG, JPEG, WebP); repeatable.")],
            prompt: Annotated[str, typer.Option("-p", "--prompt", help="What to ask about the image(s).")],
            system: Annotated[Optional[str], typer.Option("--system", help="System message.")] = None,
            max_tokens: Annotated[int, typer.Option("--max-tokens", min=1)] = 128,
            temp: Annotated[float, typer.Option("--temp", min=0.0)] = 0.2,
            top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
            seed: Annotated[int, typer.Option("--seed")] = 0,
            ctx: Annotated[int, typer.Option("--ctx", min=64)] = 4096,
            threads: Threads = None,
            n_gpu_layers: Annotated[int, typer.Option("--n-gpu-layers", help="Layers on Metal/CUDA when built with them.")] = 0,
            mmproj_cpu: Annotated[bool, typer.Option("--mmproj-cpu", help="Keep the vision encoder on the CPU.")] = False,
            raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
            ) -> None:
        """Generate text for image(s) with the pair, streaming to stdout."""
        from ..pair import Pair, user_messages

        messages = user_messages(image, prompt, system)  # reads and checks the images first
        pair = Pair(text, mmproj, n_ctx=ctx, n_threads=threads, n_gpu_layers=n_gpu_layers,
                    mmproj_cpu=mmproj_cpu, seed=seed, raw=raw)
        for piece in pair.chat(messages, stream=True, max_tokens=max_tokens, temperature=temp, top_p=top_p, seed=seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
