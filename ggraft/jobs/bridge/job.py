"""``ggraft bridge``: a donor's mmproj re-targeted to a text model of another width and vocabulary.

The steps: read the donor mmproj's header and find its last layer (``last_layer``); pair the
tokens the donor's text model and the recipient share (``tokens``); read their embedding rows
(``tables``); fit the map and score it on held-out tokens (``fit``); refuse a fit too poor to be
useful unless forced; write the mmproj with the map composed into its last layer (``write``);
then check the pair as ``ggraft check`` does, for what a user must still know.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ggraft.errors import IncompatibleError, InputError, UnsupportedModelError
from ggraft.gguf_io import gguf_file, output, output_types
from ggraft.gguf_io.gguf_file import GGUFIndex
from ggraft.jobs.graft import family_of, header_sha256
from ggraft.pair.check import CheckReport, check_pair
from ggraft.pair.headers import projector_type, text_width
from .fit import FitScores, LinearMap, fit_map, held_out_first
from .last_layer import LastLayer, last_layer, output_width
from .tables import TOKEN_EMBD, TextModel, embedding_rows, open_text_model
from .tokens import shared_tokens
from .write import BridgePlan, write_bridged

K = gguf.Keys
#: the fit is refused (without --force) below this held-out top-1 retrieval: under it the map sends
#: most held-out tokens nearer another token's row than their own (README, "Bridging")
MIN_TOP1 = 0.5
#: ... and with fewer held-out tokens than this, whose scores would say little
MIN_HELD_OUT = 50


@dataclass
class BridgeReport:
    output: str
    donor_mmproj: str
    donor_text: str
    recipient: str
    projector_type: str
    widths: dict[str, int]
    fit: FitScores
    last_layer: dict[str, Any]
    #: mmproj tensor -> where its values came from (text-model rows)
    rows: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    forced: bool = False
    check: CheckReport | None = None
    linear: LinearMap | None = None  # the fitted map (not serialized)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("check", "linear", "fit")}
        data["fit"] = self.fit.to_dict()
        data["check"] = self.check.to_dict() if self.check is not None else None
        return data


def bridge(mmproj: str | Path, donor_text: str | Path, text: str | Path, out: str | Path,
           outtype: str | None = None, force: bool = False) -> BridgeReport:
    """Write ``mmproj`` (an mmproj GGUF or a checkpoint folder) re-targeted from ``donor_text``'s
    embedding space to ``text``'s, to ``out``."""
    out, mmproj = Path(out), Path(mmproj)
    output.check_output(out, force)
    if out.resolve() in {Path(p).resolve() for p in (mmproj, donor_text, text)}:
        raise InputError(f"{out}: the output would overwrite an input")
    qtype = output.parse_outtype(outtype) if outtype else None
    if not mmproj.is_dir():
        return _bridge(mmproj, mmproj.name, Path(donor_text), Path(text), out, qtype, force)
    from ggraft.hf.checkpoint import Checkpoint
    from ggraft.mmproj.converter import converter_for
    from ggraft.mmproj.writer import convert

    converter = converter_for(Checkpoint(mmproj))  # refuses what it cannot convert before any work
    work = Path(tempfile.mkdtemp(prefix=f".{out.name[:40]}.ggraft-bridge-", dir=out.parent))
    try:
        donor = convert(converter, work / "donor-f32.gguf", "f32")
        return _bridge(donor, mmproj.resolve().name, Path(donor_text), Path(text), out,
                       qtype or output.OUTTYPES[output_types.DEFAULT], force)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def open_donor_mmproj(path: Path) -> tuple[GGUFIndex, str, LastLayer]:
    """The donor mmproj's index, projector type and last layer, or the InputError saying why not."""
    m = gguf_file.scan_gguf(path, "mmproj GGUF")
    arch = m.value(K.General.ARCHITECTURE)
    if arch != "clip":
        raise InputError(f"{path}: is not an mmproj (general.architecture {arch!r}; an mmproj has 'clip')",
                         hint="--mmproj takes the donor's mmproj GGUF or checkpoint folder; --text the recipient")
    if not m.value(K.Clip.HAS_VISION_ENCODER, False):
        raise InputError(f"{path}: has no vision encoder (clip.has_vision_encoder is not true)")
    if m.value(K.Clip.HAS_AUDIO_ENCODER, False):
        raise UnsupportedModelError(f"{path}: also has an audio encoder, whose projector feeds the donor's width too; "
                                    "ggraft bridge re-targets vision-only mmprojs")
    projector = projector_type(m)
    if projector is None:
        raise InputError(f"{path}: has no clip.projector_type")
    return m, projector, last_layer(m, projector)


def _bridge(mmproj: Path, donor_name: str, donor_text: Path, text: Path, out: Path, qtype, force: bool) -> BridgeReport:
    m, projector, layer = open_donor_mmproj(mmproj)
    donor = open_text_model(gguf_file.scan_gguf(donor_text, "donor text GGUF"), "--donor-text")
    recipient = open_text_model(gguf_file.scan_gguf(text, "text GGUF"), "--text")
    if text_width(recipient.index) != recipient.width:
        raise InputError(f"{text}: {recipient.architecture!r} with DeepStack layers reads "
                         f"{text_width(recipient.index)} values per image token; a bridged mmproj gives "
                         f"{recipient.width}",
                         hint="bridge to a text model without DeepStack layers")
    if output_width(m, layer) != donor.width:
        raise InputError(f"{donor_name} projects to {output_width(m, layer)} but {donor.name} embeds in {donor.width}",
                         hint="--donor-text is the text model the mmproj was made for")
    linear, scores = fit_between(donor, recipient, intercept=layer.bias is not None)
    problem = fit_problem(scores)
    if problem and not force:
        raise IncompatibleError(f"the fit is too poor to be useful: {problem}",
                                hint="--force writes the mmproj anyway")
    report = BridgeReport(str(out), donor_name, donor.name, recipient.name, projector,
                          {"donor": donor.width, "recipient": recipient.width}, scores,
                          {"weight": layer.weight, "bias": layer.bias, "source": layer.source,
                           "map": "W x + b" if layer.bias else "W x"}, forced=bool(problem), linear=linear)
    plan = BridgePlan(layer, linear, recipient.width)
    plan.rows = text_rows(m, projector, donor, recipient, linear, report)
    plan.provenance = {"donor_mmproj": donor_name, "donor_text": donor.name, "recipient": recipient.name,
                       "recipient_header_sha256": header_sha256(text, recipient.index), "map": report.last_layer["map"],
                       "shared_tokens": scores.shared, "fitted_tokens": scores.fitted,
                       "held_out_tokens": scores.held_out, "held_out_top1": scores.top1,
                       "held_out_mean_cosine": scores.mean_cosine, "ridge": scores.ridge}
    _notes(report, layer, donor, recipient, problem)
    write_bridged(m, plan, projector, out, qtype)
    report.check = check_pair(text, out)
    return report


def fit_between(donor: TextModel, recipient: TextModel, intercept: bool) -> tuple[LinearMap, FitScores]:
    """The map from the donor's input-embedding space to the recipient's, over the tokens they share."""
    shared = shared_tokens(donor.index, recipient.index)
    if not len(shared):
        raise InputError(f"no shared tokens: {donor.name} and {recipient.name} have no normal token in common",
                         hint="the two vocabularies must share text pieces (words, subwords) to fit a map on")
    order, n_held = held_out_first(len(shared))
    x = embedding_rows(donor, shared.donor_ids[order])
    y = embedding_rows(recipient, shared.recipient_ids[order])
    return fit_map(x, y, n_held, intercept)


def fit_problem(scores: FitScores) -> str | None:
    """Why a fit is too poor to be useful (None: it is not)."""
    if scores.held_out < MIN_HELD_OUT:
        return (f"only {scores.held_out} of {scores.shared} shared tokens are held out; at least {MIN_HELD_OUT} "
                "are needed for the scores to mean something")
    if scores.top1 < MIN_TOP1:
        return (f"held-out top-1 retrieval {scores.top1:.1%} (mean cosine {scores.mean_cosine:.3f}, over "
                f"{scores.held_out} of {scores.shared} shared tokens) is below {MIN_TOP1:.0%}")
    return None


def text_rows(m: GGUFIndex, projector: str, donor: TextModel, recipient: TextModel, linear: LinearMap,
              report: BridgeReport) -> dict[str, np.ndarray]:
    """The text-model rows the mmproj carries: the recipient's own where it has the token, else the
    donor's row mapped."""
    family = family_of(projector)
    rows = {}
    for name, token in (family.text_rows if family is not None else {}).items():
        tid = recipient.index.find_strings(K.Tokenizer.LIST, [token]).get(token)
        if tid is not None:
            rows[name] = gguf_file.tensor_row(recipient.table, TOKEN_EMBD, tid) * recipient.input_scale
            report.rows[name] = f"{recipient.name} token {token} (id {tid}), its own row"
            continue
        if m.tensor(name) is not None:
            row, where = gguf_file.tensor_values(m, name).reshape(-1), "the donor mmproj's row"
        else:
            did = donor.index.find_strings(K.Tokenizer.LIST, [token]).get(token)
            if did is None:
                raise InputError(f"{m.path}: has no {name} and neither {donor.name} nor {recipient.name} has {token}")
            row, where = gguf_file.tensor_row(donor.table, TOKEN_EMBD, did) * donor.input_scale, f"{donor.name}'s row"
        rows[name] = linear(row)
        report.rows[name] = f"{where} for {token}, mapped ({recipient.name} has no {token} token)"
    return rows


def _notes(report: BridgeReport, layer: LastLayer, donor: TextModel, recipient: TextModel, problem: str | None) -> None:
    if problem:
        report.notes.append(f"written with --force although {problem}")
    if layer.leaves_out:
        report.notes.append(f"left out {', '.join(p + '*' for p in layer.leaves_out)}: {layer.leaves_out_why}")
    if layer.bias is None:
        report.notes.append(f"llama.cpp adds no bias after {layer.weight}, so the map was fitted through the origin")
    for model in (donor, recipient):
        if model.input_scale != 1.0:
            report.notes.append(f"{model.name}: llama.cpp scales {model.architecture!r} token embeddings by "
                                f"{model.input_scale:.4g} but not image embeddings; the map works on the scaled rows")
