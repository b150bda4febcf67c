"""Qwen2.5-Omni's vision side -> projector ``qwen2.5o`` (a vision-only file).

The tower is Qwen2.5-VL's (see converters/qwen2vl.py: same defaults, window attention, 2x2 merger),
inside the thinker.  What is special here:
- the vision config is nested in ``thinker_config`` (the full model, ``Qwen2_5OmniForConditionalGeneration``
  and the hub's ``Qwen2_5OmniModel``); the thinker (``Qwen2_5OmniThinkerForConditionalGeneration``) and its
  bare model (``Qwen2_5OmniThinkerModel``) hold it at the top.  Tensors: ``thinker.visual.*`` (full model),
  ``visual.*`` (thinker), or the module names ``thinker.model.visual.*`` / ``model.visual.*``.
- q, k and v are separate linears (Qwen2.5-VL fuses them); gguf-py maps them as they are.
- projector type: llama.cpp's converter writes ``qwen2.5o`` for a vision + audio file (conversion/qwenvl.py
  165-179); clip.cpp reads its vision side as ``qwen2.5vl_merger`` (clip.cpp:1291-1296) and loads a file
  with only ``clip.has_vision_encoder`` (clip.cpp:1221-1222, 4011-4025: the audio context is never made).
  ggraft writes the vision side only, typed ``qwen2.5o``: the runtime runs exactly the ``qwen2.5vl_merger``
  graph either way, and the type keeps saying which model the file is for (``check``, ``inspect``, and any
  llama.cpp fix that tells Omni from Qwen2.5-VL).
- transformers' reference is the thinker: ``Qwen2_5OmniForConditionalGeneration.from_pretrained`` insists
  on the pickled ``spk_dict.pt``, and the thinker loads from the full model's folder as well.
Runtime defects: the window size Qwen2.5-VL's has (qwen2vl.py), and the boundary tokens: mtmd.cpp:695-702
puts ``<|vision_start|>``/``<|vision_end|>`` around every image of this type, which Qwen2.5-Omni's
vocabulary does not have (it spells the same ids ``<|vision_bos|>``/``<|vision_eos|>``): llama.cpp tokenizes
them as plain text (mtmd.cpp:1360-1361, parse_special), so the model sees pieces it was never trained on.
"""
from __future__ import annotations

import dataclasses

import gguf

from ggraft.mmproj.converter import register
from ggraft.mmproj.facts import Convention, RuntimeDefect
from .qwen2vl import Qwen25VL

QWEN25O = gguf.VisionProjectorType.QWEN25O
THINKER = "Qwen2_5OmniThinkerForConditionalGeneration"
BOUNDARY_DEFECT = "mtmd.cpp:695-702"


@register
class Qwen25Omni(Qwen25VL):
    architectures = ("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniModel", THINKER, "Qwen2_5OmniThinkerModel")
    projector_type = QWEN25O
    family = "Qwen2.5-Omni (vision)"
    image_tokens = ("<|vision_bos|>", "<|IMAGE|>", "<|vision_eos|>")
    convention = Convention("Qwen2.5-Omni", ("<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>"))
    layout_aliases = (("thinker.model.visual.", "visual."), ("thinker.visual.", "visual."),
                      ("model.visual.", "visual."))
    # the full model's transformers class needs the pickled spk_dict.pt: its thinker holds the same tower
    reference_classes = {"Qwen2_5OmniForConditionalGeneration": THINKER, "Qwen2_5OmniModel": THINKER}
    window_defect = dataclasses.replace(Qwen25VL.runtime_defects[0], projector=QWEN25O)
    runtime_defects = (window_defect, RuntimeDefect(
        QWEN25O, "llama.cpp marks qwen2.5o images with <|vision_start|>/<|vision_end|> (Qwen2.5-VL's spelling; "
        f"{BOUNDARY_DEFECT} via clip.cpp:1291-1296), which Qwen2.5-Omni's vocabulary spells <|vision_bos|>/"
        "<|vision_eos|>: each is tokenized as plain text the model never saw around an image",
        "ggraft README, Known llama.cpp deviations", seen_up_to="0.3.36",
        boundary_tokens=("<|vision_start|>", "<|vision_end|>")),)

    @property
    def runtime_note(self):
        """What ``runtime_reference`` emulates (the window only: the boundary tokens are not embeddings)."""
        d = self.window_defect
        return f"{d.summary} ({d.reference})"
