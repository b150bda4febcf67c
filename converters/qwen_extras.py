"""Qwen4-Exp and Qwen3-Omni's vision side -> projector ``qwen3vl_merger``.

Both reuse the Qwen3-VL tower (see converters/qwen3vl.py); what is special here:
- Qwen4-Exp (``Qwen4ExpForConditionalGeneration``): Qwen3.5's tower, no DeepStack, under
  ``model.visual.*``.  Its text model (n-gram PLE, QSA, hyper-connections) is llama.cpp's
  ``qwen4exp`` architecture (conversion/qwen4exp.py 16-26, 192-195: "an unmodified Qwen3-VL ViT").
- Qwen3-Omni (``Qwen3OmniMoeForConditionalGeneration`` and its thinker alone,
  ``Qwen3OmniMoeThinkerForConditionalGeneration``): Qwen3-VL's tower with DeepStack, its
  ``vision_config`` nested in ``thinker_config`` (the full model), saved as ``thinker.visual.*``
  (the full model) or ``visual.*`` (the thinker), with Qwen2-VL-era merger names
  (``merger.ln_q``, ``merger.mlp.0/2``; DeepStack as ``merger_list.<i>``).  Only the vision
  side is written: llama.cpp's converter writes a vision + audio file (conversion/qwen3vl.py
  147-220, audio as ``qwen3a``); a vision-only file is what clip.cpp loads for an image
  projector whose ``clip.has_audio_encoder`` is absent.  transformers' features are the thinker's
  ``get_image_features``.
"""
from __future__ import annotations

import re

from ggraft.mmproj.converter import register
from .qwen3vl import Qwen3VL, Qwen35

#: Qwen3-Omni's merger names -> Qwen3-VL's (the part after ``visual.``)
OMNI_MERGER = ((re.compile(r"^visual\.merger_list\.(\d+)\."), r"visual.deepstack_merger_list.\1."),
               (re.compile(r"\.ln_q\."), ".norm."), (re.compile(r"\.mlp\.0\."), ".linear_fc1."),
               (re.compile(r"\.mlp\.2\."), ".linear_fc2."))


@register
class Qwen4Exp(Qwen35):
    """Qwen4-Exp: Qwen3.5's tower (transformers builds no DeepStack mergers for it)."""

    architectures = ("Qwen4ExpForConditionalGeneration",)
    family = "Qwen4-Exp"


@register
class Qwen3Omni(Qwen3VL):
    """Qwen3-Omni's vision tower: Qwen3-VL's, DeepStack included, inside the thinker."""

    architectures = ("Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration")
    family = "Qwen3-Omni (vision)"
    layout_aliases = (("thinker.model.visual.", "visual."), ("thinker.visual.", "visual."),
                      ("model.visual.", "visual."))

    def rename(self, canonical):
        if canonical.startswith(("visual.merger.", "visual.merger_list.")):
            for pattern, repl in OMNI_MERGER:
                canonical = pattern.sub(repl, canonical)
        return super().rename(canonical)

    def reference_features(self, model, pixel_values):
        return super().reference_features(getattr(model, "thinker", model), pixel_values)
