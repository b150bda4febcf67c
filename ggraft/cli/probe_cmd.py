"""ggraft probe HF_DIR --image IMG"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import output
from .options import Json

SPARK = "▁▂▃▄▅▆▇█"


def probe(
    hf_dir: Annotated[Path, typer.Argument(help="The Hugging Face checkpoint folder.")],
    image: Annotated[Path, typer.Option("--image", metavar="IMG", help="The image to look at.")],
    prompt: Annotated[str, typer.Option("-p", "--prompt", help="The text after the image.")] = "Describe the image.",
    json: Json = False,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="PNG", help="Write the curves to a PNG (needs matplotlib).")] = None,
    compare: Annotated[Path | None, typer.Option("--compare", metavar="OTHER_DIR", help="A second checkpoint (e.g. before a merge), probed the same way and drawn on the same plot.")] = None,
    fraction: Annotated[float, typer.Option("--fraction", help="Saturation: the share stays below this fraction of the first layer's.")] = 0.25,
) -> None:
    """Show, per language-model layer, how much text tokens attend to the image (the DPVR saturation curve).

    One forward pass in transformers (eager attention) on one image and prompt. Per layer: the share of
    text queries' attention (tokens after the image) that lands on image tokens, averaged over heads and
    queries; that share over the image tokens' share of the context (1.0 = uniform attention); and how
    much image and text hidden states still change (1 - cosine to the previous layer). The saturation
    layer is the first from which the share stays below --fraction of the first layer's. The default 0.25
    marks the end of the early fall DPVR measured on LLaVA-1.5 (0.68 at layer 1, 0.07 by layer 4), above
    the noise of the flat tail.

    The image is fed at the family's own size (as verify feeds it) and the prompt goes through the
    checkpoint's chat template, the image token repeated once per image feature. Families: every one
    ggraft converts whose transformers class returns attention weights: LLaVA (CLIP or SigLIP),
    Mistral 3 / Pixtral,
    Gemma 3, Gemma 4, Idefics3 / SmolVLM (first tile), InternVL, LFM2-VL (its attention layers; its
    convolutions show as —), Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 (full-attention layers), Step-3.7,
    HunyuanOCR, EXAONE 4.5, GLM-5 Next (its MLA layers; multi-stream residuals compared as their mean),
    GLM-4V, GLM-OCR, LightOnOCR, Janus-Pro, Kimi-K2.5, MiniMax-M3, PaddleOCR-VL, MiniCPM-V 4.6 (the
    overview), LLaVA-NeXT, LLaVA-OneVision and Granite 4 Vision (anyres tiles from the checkpoint's own
    image processor), Qwen3-Omni (whole or thinker-only; the thinker is probed), Llama 4 (transformers
    5.24's wrapper fails after its text model ran, modeling_llama4.py:1318: probe reads the text model's
    output). Not: Gemma 3n (its tower needs timm).
    Needs the verify extra (torch, transformers); --plot the plot extra (matplotlib)."""
    from ggraft.jobs import probe as probe_job

    if plot is not None:
        probe_job.plotting()  # refused before the model runs
    reports = [probe_job.probe(hf_dir, image, prompt, fraction)]
    if compare is not None:
        reports.append(probe_job.probe(compare, image, prompt, fraction))
    if plot is not None:
        probe_job.plot(reports, plot)
    if json:
        output.emit_json([r.to_dict() for r in reports] if compare is not None else reports[0].to_dict())
    else:
        for r in reports:
            render(r)
    if plot is not None:
        output.note(f"wrote {plot}")


def sparkline(values: list[float | None]) -> str:
    """One bar per value, scaled to the largest; a space for a layer without attention (None)."""
    top = max((v for v in values if v is not None), default=0.0) or 1.0
    return "".join(" " if v is None else SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))]
                   for v in values)


def render(report) -> None:
    from rich.table import Table

    output.stdout.print(f"{report.checkpoint} ({report.architecture}): {report.image_tokens} image tokens, "
                        f"{report.text_queries} text queries, context {report.context}")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for name in ("layer", "text→image", "÷ uniform", "image change", "text change"):
        table.add_column(name, justify="right")
    for i, row in enumerate(zip(report.text_to_image, report.normalized, report.image_change, report.text_change)):
        mark = " *" if i == report.saturation_layer else ""
        table.add_row(f"{i}{mark}", *("—" if v is None else f"{v:.4f}" for v in row))
    output.stdout.print(table)
    output.stdout.print(f"text→image {sparkline(report.text_to_image)}  (uniform share {report.uniform_share:.4f})")
    where = "never" if report.saturation_layer is None else f"layer {report.saturation_layer} (*)"
    output.stdout.print(f"saturation (share < {report.fraction:g} x layer 0's from then on): {where}")
