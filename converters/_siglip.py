"""Facts shared by the SigLIP-based families (Gemma 3, Idefics3/SmolVLM, LFM2-VL).

A leading underscore keeps this module out of the converter registry's discovery.
"""
from __future__ import annotations

SIGLIP_MEAN = [0.5, 0.5, 0.5]  # the SigLIP image processors' defaults
SIGLIP_STD = [0.5, 0.5, 0.5]
#: activations llama.cpp computes as GELU: ggml's GELU is the tanh form, which these all are or approximate
GELU_ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu")
