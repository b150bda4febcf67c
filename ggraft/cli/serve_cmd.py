"""ggraft serve TEXT.gguf MMPROJ.gguf [--host 127.0.0.1] [--port 8080]"""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import output
from .options import ExtraBufts, MmprojGguf, TextGguf, Threads


def serve(text: TextGguf, mmproj: MmprojGguf,
          host: Annotated[str, typer.Option("--host", metavar="ADDR", help="Address to listen on (loopback by default).")] = "127.0.0.1",
          port: Annotated[int, typer.Option("--port", metavar="N", min=0, max=65535, help="Port (0: any free port).")] = 8080,
          alias: Annotated[Optional[str], typer.Option("--alias", metavar="NAME", help="Model name in /v1/models (default: the text GGUF's file name).")] = None,
          api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", help="Require this bearer token.")] = None,
          local_files: Annotated[Optional[bool], typer.Option("--local-files/--no-local-files",
                                                              help="Accept image_url paths to local files (default: only on a loopback address).")] = None,
          ctx: Annotated[int, typer.Option("--ctx", metavar="N", min=64, help="Context size in tokens.")] = 4096,
          threads: Threads = None,
          n_gpu_layers: Annotated[int, typer.Option("--n-gpu-layers", metavar="N", help="Layers on Metal/CUDA when built with them (-1: all).")] = 0,
          mmproj_cpu: Annotated[bool, typer.Option("--mmproj-cpu", help="Keep the vision encoder on the CPU.")] = False,
          seed: Annotated[int, typer.Option("--seed", metavar="N", help="Initial sampling seed (a request may send its own).")] = 0,
          extra_bufts: ExtraBufts = None,
          ) -> None:
    """Serve a text model + mmproj pair with an OpenAI-compatible API.

    The pair is checked first.  /v1/chat/completions takes image_url parts (data: URIs or local
    files), streaming or not; /v1/models lists the model."""
    from ggraft.jobs.serve import is_loopback, serve as run_server

    def ready(url: str, pair) -> None:
        for warning in pair.warnings:
            output.note(f"Warning: {warning}")
        if not is_loopback(host):
            output.note(f"Warning: listening on {host}: anyone who can reach it can use the model"
                        + ("" if api_key else " (consider --api-key)"))
        output.note(f"Serving {alias or text.stem} at {url} (OpenAI-compatible; Ctrl-C to stop)")

    run_server(text, mmproj, host=host, port=port, alias=alias, api_key=api_key, allow_files=local_files,
               on_ready=ready, n_ctx=ctx, n_threads=threads, n_gpu_layers=n_gpu_layers,
               mmproj_cpu=mmproj_cpu, seed=seed, extra_bufts=extra_bufts)
