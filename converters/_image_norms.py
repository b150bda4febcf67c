"""Facts shared by several families: the image normalizations of the CLIP and SigLIP image
processors, and the activations llama.cpp computes as GELU.

A leading underscore keeps this module out of the converter registry's discovery.
"""
from __future__ import annotations

#: OpenAI CLIP's normalization (also mistral_common's DATASET_MEAN / DATASET_STD and Qwen-VL's)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = [0.5, 0.5, 0.5]  # the SigLIP image processors' defaults
SIGLIP_STD = [0.5, 0.5, 0.5]
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # torchvision's ImageNet normalization (InternVL's processors)
IMAGENET_STD = [0.229, 0.224, 0.225]
#: activations llama.cpp computes as GELU: ggml's GELU is the tanh form, which these all are or approximate
GELU_ACTS = ("gelu_pytorch_tanh", "gelu_new", "gelu")
#: the VisionParams flags for each tower activation llama.cpp's generic ViT graph runs (GELU's tanh form,
#: SiLU, or GELU-quick when no flag is set); an activation not here has no llama.cpp equivalent
ACTIVATIONS = {**{act: {"use_gelu": True} for act in GELU_ACTS}, "silu": {"use_silu": True}, "quick_gelu": {}}
