"""Data: every vision projector type of the installed llama.cpp, and what stands behind it.

One row per vision projector type of ``tools/mtmd/clip-impl.h`` (``PROJECTOR_TYPE_NAMES``) of the
llama.cpp that llama-cpp-python 0.3.36 vendors (``ggraft.pair.boundary_tokens.LLAMA_CPP_SOURCE``),
holding only what ggraft's converter registry cannot know:

- ``architectures``: the Hugging Face architectures (config.json ``architectures[0]``) whose
  checkpoints llama.cpp runs with this projector type: the ones its converter registers
  (``conversion/__init__.py`` ``MMPROJ_MODEL_MAP`` and the ``@ModelBase.register`` class that
  writes the type), and transformers' own spelling where it differs.  Empty for models converted
  only by the legacy scripts in ``tools/mtmd/legacy-models/`` from remote-code checkpoints.
- ``llama_cpp``: whether llama.cpp's own converter handles them, and how.
- ``transformers``: the classes of the installed transformers (read at ``TRANSFORMERS_READ``)
  that build these models; ``transformers_note`` says why there is none, or what is missing.
- ``pending``: why ggraft does not convert the type (or the row's architectures its converters
  leave out) yet.  Shown only while that is so: once a registered converter writes the type and
  takes every architecture, the row reads as covered whatever ``pending`` says.

``docs/families_table.py`` joins these rows with the registry (``discover()``) and the fidelity
figures the tests record, and writes the README's coverage table.  Update the rows together with
the llama-cpp-python pin.
"""
from __future__ import annotations

from dataclasses import dataclass

TRANSFORMERS_READ = "5.24"  # the transformers release the ``transformers`` column was read from

NO_REFERENCE = "no transformers model to prove a conversion against"
REMOTE_CODE = "no class (remote code only)"


@dataclass(frozen=True)
class ProjectorRow:
    """What stands behind one vision projector type (see the module docstring)."""

    projector_type: str
    models: str
    architectures: tuple[str, ...]
    llama_cpp: str
    transformers: tuple[str, ...] = ()
    transformers_note: str = ""
    pending: str = ""


ROWS: tuple[ProjectorRow, ...] = (
    ProjectorRow("mlp", "LLaVA-1.5 and LLaVA-style models with a SigLIP tower, LLaVA-NeXT, LLaVA-OneVision, "
                 "Granite Vision 3.x",
                 ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                  "LlavaOnevisionForConditionalGeneration"),
                 "legacy scripts (`llava_surgery_v2.py`, `convert_image_encoder_to_gguf.py`)",
                 ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                  "LlavaOnevisionForConditionalGeneration")),
    ProjectorRow("ldp", "MobileVLM", (),
                 "legacy scripts (`llava_surgery.py`, `convert_image_encoder_to_gguf.py --projector-type ldp`)",
                 transformers_note=REMOTE_CODE, pending=NO_REFERENCE),
    ProjectorRow("ldpv2", "MobileVLM V2", (),
                 "legacy scripts (`llava_surgery.py`, `convert_image_encoder_to_gguf.py --projector-type ldpv2`)",
                 transformers_note=REMOTE_CODE, pending=NO_REFERENCE),
    ProjectorRow("resampler", "MiniCPM-V 2–4.5, MiniCPM-o 2.6–4.5", (),
                 "legacy scripts (`minicpmv-surgery.py`, `minicpmv-convert-image-encoder-to-gguf.py`)",
                 transformers_note=REMOTE_CODE, pending=NO_REFERENCE),
    ProjectorRow("adapter", "GLM-Edge-V", (),
                 "legacy scripts (`glmedge-surgery.py`, `glmedge-convert-image-encoder-to-gguf.py`)",
                 transformers_note=REMOTE_CODE, pending=NO_REFERENCE),
    ProjectorRow("qwen2vl_merger", "Qwen2-VL, Sarashina2-Vision",
                 ("Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Sarashina2VisionForCausalLM"), "yes",
                 ("Qwen2VLForConditionalGeneration", "Qwen2VLModel"), "Sarashina2-Vision: remote code only",
                 pending=f"Sarashina2-Vision: {NO_REFERENCE}"),
    ProjectorRow("qwen2.5vl_merger", "Qwen2.5-VL", ("Qwen2_5_VLForConditionalGeneration",),
                 "yes (wrong `n_wa_pattern` for non-periodic full-attention blocks)",
                 ("Qwen2_5_VLForConditionalGeneration",)),
    ProjectorRow("qwen3vl_merger", "Qwen3-VL, Qwen3.5, Qwen3-Omni (vision), Qwen4-Exp",
                 ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                  "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
                  "Qwen3OmniMoeForConditionalGeneration", "Qwen4ExpForConditionalGeneration"),
                 "yes (Qwen3-Omni: a vision + audio file; ggraft writes the vision side only)",
                 ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                  "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
                  "Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration",
                  "Qwen4ExpForConditionalGeneration")),
    ProjectorRow("ling3vl", "Ling-3.0-flash-VL", ("BailingMoeV3VLForConditionalGeneration",), "yes",
                 transformers_note=REMOTE_CODE, pending=NO_REFERENCE),
    ProjectorRow("step3vl", "Step3-VL, Step-3.7-Flash",
                 ("StepVLForConditionalGeneration", "Step3p7ForConditionalGeneration"),
                 "yes (Step3-VL-10B's shape only: asserts image 728, width 1536, 47 blocks and the config key "
                 "`understand_projector_stride`, which transformers' `Step3p7Config` does not write; "
                 "conversion/step3.py:38-43)",
                 ("Step3p7ForConditionalGeneration",), "Step3-VL-10B: remote code only",
                 pending=f"Step3-VL-10B: converted from the hub layout it shares with Step-3.7, untested "
                         f"({NO_REFERENCE})"),
    ProjectorRow("gemma3", "Gemma 3", ("Gemma3ForConditionalGeneration",), "yes",
                 ("Gemma3ForConditionalGeneration",)),
    ProjectorRow("gemma3nv", "Gemma 3n", ("Gemma3nForConditionalGeneration",), "yes (vision + audio file)",
                 ("Gemma3nForConditionalGeneration",), "the vision tower needs timm"),
    ProjectorRow("gemma4v", "Gemma 4", ("Gemma4ForConditionalGeneration",), "yes",
                 ("Gemma4ForConditionalGeneration",)),
    ProjectorRow("gemma4uv", "Gemma 4 unified", ("Gemma4UnifiedForConditionalGeneration",), "yes (vision + audio file)",
                 ("Gemma4UnifiedForConditionalGeneration",)),
    ProjectorRow("phi4", "Phi-4-reasoning-vision", ("Phi4ForCausalLMV",), "yes",
                 transformers_note="no class (remote code only; `Phi4MultimodalForCausalLM` is Phi-4-multimodal, "
                                   "which llama.cpp does not run)", pending=NO_REFERENCE),
    ProjectorRow("idefics3", "Idefics3, SmolVLM",
                 ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"), "yes",
                 ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")),
    ProjectorRow("pixtral", "Pixtral, Mistral Small 3.x",
                 ("Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration"),
                 "yes (and Mistral's native `params.json` layout)",
                 ("Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration")),
    ProjectorRow("internvl", "InternVL 2.5 / 3", ("InternVLChatModel", "InternVLForConditionalGeneration"),
                 "`InternVLChatModel` only (refuses transformers' layout; position rows in the wrong order: 0.998)",
                 ("InternVLForConditionalGeneration",), "`InternVLChatModel`: remote code"),
    ProjectorRow("llama4", "Llama 4", ("Llama4ForConditionalGeneration",), "yes (misnames the pre-FFN norm)",
                 ("Llama4ForConditionalGeneration",)),
    ProjectorRow("qwen2.5o", "Qwen2.5-Omni", ("Qwen2_5OmniModel",),
                 "yes (a vision + audio file; the runtime reads its vision side as `qwen2.5vl_merger`; ggraft writes "
                 "the vision side only)",
                 ("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration",
                  "Qwen2_5OmniThinkerModel")),
    ProjectorRow("lfm2", "LFM2-VL", ("Lfm2VlForConditionalGeneration",), "yes",
                 ("Lfm2VlForConditionalGeneration",)),
    ProjectorRow("kimivl", "Kimi-VL", ("KimiVLForConditionalGeneration",), "yes",
                 transformers_note=REMOTE_CODE, pending=NO_REFERENCE),
    ProjectorRow("paddleocr", "PaddleOCR-VL", ("PaddleOCRVLForConditionalGeneration",),
                 "hub layout only (through `PaddleOCRVisionModel`; refuses transformers' `save_pretrained` layout)",
                 ("PaddleOCRVLForConditionalGeneration",)),
    ProjectorRow("lightonocr", "LightOnOCR",
                 ("LightOnOCRForConditionalGeneration", "LightOnOcrForConditionalGeneration"),
                 "yes, as `LightOnOCRForConditionalGeneration` (writes no `preproc_image_size`: resizes to the "
                 "tower's `image_size`)",
                 ("LightOnOcrForConditionalGeneration", "LightOnOcrModel")),
    ProjectorRow("cogvlm", "CogVLM, CogVLM2", ("CogVLMForCausalLM",), "yes",
                 transformers_note=REMOTE_CODE, pending=NO_REFERENCE),
    ProjectorRow("janus_pro", "Janus-Pro", ("JanusForConditionalGeneration", "JanusModel"),
                 "`JanusForConditionalGeneration` only (`clip.use_gelu` for `gelu` alone: other GELUs run GELU-quick)",
                 ("JanusForConditionalGeneration", "JanusModel")),
    ProjectorRow("dots_ocr", "dots.ocr", ("DotsOCRForCausalLM",), "yes",
                 transformers_note=REMOTE_CODE, pending=NO_REFERENCE),
    ProjectorRow("dots3note_v", "dots3-note (vision + audio)",
                 ("Dots3NoteForConditionalGeneration", "Dots3NoteForCausalLM"),
                 "yes (a vision + audio file: asserts an audio tower; reads the hub's config names `embed_dim`, "
                 "`pyramid_num_routed`, `capacity_factor`, which transformers' own `save_pretrained` config lacks; "
                 "refuses `router_scale` other than 1)",
                 ("Dots3NoteForConditionalGeneration",),
                 "`Dots3NoteForCausalLM`, the released config's architecture, is the text model in transformers"),
    ProjectorRow("deepseekocr", "DeepSeek-OCR, Unlimited-OCR",
                 ("DeepseekOCRForCausalLM", "UnlimitedOCRForCausalLM", "UnlimitedOcrForConditionalGeneration"),
                 "yes, as `DeepseekOCRForCausalLM`, `UnlimitedOCRForCausalLM` (remote-code configs only; fixes the "
                 "tile limits at 9 and 32)",
                 ("UnlimitedOcrForConditionalGeneration",), "DeepSeek-OCR and `UnlimitedOCRForCausalLM`: remote code only",
                 pending=f"DeepSeek-OCR, `UnlimitedOCRForCausalLM`: {NO_REFERENCE}"),
    ProjectorRow("deepseekocr2", "DeepSeek-OCR 2",
                 ("DeepseekOCR2ForCausalLM", "DeepseekOcr2ForConditionalGeneration"),
                 "yes, as `DeepseekOCR2ForCausalLM` (remote-code config only; fixes 2 KV heads and 6 tiles)",
                 ("DeepseekOcr2ForConditionalGeneration",), "`DeepseekOCR2ForCausalLM`: remote code only",
                 pending=f"`DeepseekOCR2ForCausalLM`: {NO_REFERENCE}"),
    ProjectorRow("deepseek4v", "DeepSeek-V4-Flash-Vision", ("DeepseekV4ForCausalLM",), "yes",
                 transformers_note="no vision class (`DeepseekV4ForCausalLM` is the text model)", pending=NO_REFERENCE),
    ProjectorRow("glm4v", "GLM-4.1V, GLM-4.5V, GLM-4.6V, GLM-OCR",
                 ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration",
                  "Glm46VForConditionalGeneration", "GlmOcrForConditionalGeneration"),
                 "yes (not `Glm46VForConditionalGeneration`)",
                 ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration",
                  "Glm46VForConditionalGeneration", "GlmOcrForConditionalGeneration")),
    ProjectorRow("glm5v", "GLM-5 Next", ("Glm5NextForConditionalGeneration",),
                 "yes (no `swiglu_clamp` or token budget unless the config files name them: llama.cpp refuses the file)",
                 ("Glm5NextForConditionalGeneration", "Glm5NextModel")),
    ProjectorRow("youtuvl", "Youtu-VL", ("YoutuVLForConditionalGeneration",), "yes",
                 transformers_note="no class (remote code only; `YoutuForCausalLM` is the text model)",
                 pending=NO_REFERENCE),
    ProjectorRow("yasa2", "Reka Edge", (), "no (the model's repository ships its own script)",
                 transformers_note="no class", pending=NO_REFERENCE),
    ProjectorRow("kimik25", "Kimi-K2.5, GLM-5.2-Vision",
                 ("KimiK25ForConditionalGeneration", "Kimi_K25ForConditionalGeneration", "Glm5vForConditionalGeneration"),
                 "yes, as `KimiK25ForConditionalGeneration`, `Glm5vForConditionalGeneration`",
                 ("Kimi_K25ForConditionalGeneration",), "GLM-5.2-Vision: no class",
                 pending=f"GLM-5.2-Vision: {NO_REFERENCE}"),
    ProjectorRow("nemotron_v2_vl", "Nemotron Nano 12B v2 VL, Nemotron 3 Nano Omni (vision)",
                 ("NemotronH_Nano_VL_V2", "NemotronH_Omni_Reasoning_V3"),
                 "`NemotronH_Nano_VL_V2` and RADIO towers only (fixes ViT-H's shapes and a 512-pixel image; "
                 "resamples the position table with `align_corners=True`; drops the tower's final LayerNorm)",
                 ("NemotronH_Omni_Reasoning_V3",), "Nano 12B v2 VL: remote code only",
                 pending=f"Nano 12B v2 VL: {NO_REFERENCE}"),
    ProjectorRow("hunyuanvl", "HunyuanOCR", ("HunYuanVLForConditionalGeneration",), "yes",
                 ("HunYuanVLForConditionalGeneration",)),
    ProjectorRow("exaone4_5", "EXAONE 4.5", ("Exaone4_5_ForConditionalGeneration",),
                 "yes (wrong `n_wa_pattern` for non-periodic full-attention blocks)",
                 ("Exaone4_5_ForConditionalGeneration",)),
    ProjectorRow("minicpmv4_6", "MiniCPM-V 4.6", ("MiniCPMV4_6ForConditionalGeneration",), "yes",
                 ("MiniCPMV4_6ForConditionalGeneration", "MiniCPMV4_6Model")),
    ProjectorRow("mimovl", "MiMo-V2.5 (vision + audio)", ("MiMoV2ForCausalLM",), "yes (vision + audio file)",
                 transformers_note="no class (remote code only; `MiMoV2FlashForCausalLM` is a text model)",
                 pending=NO_REFERENCE),
    ProjectorRow("minimax_m3", "MiniMax-M3",
                 ("MiniMaxM3SparseForConditionalGeneration", "MiniMaxM3VLForConditionalGeneration"),
                 "yes (asserts a vision head width of 80 when permuting q/k: other shapes abort)",
                 ("MiniMaxM3SparseForConditionalGeneration",), "`MiniMaxM3VLForConditionalGeneration`: no class",
                 pending=f"`MiniMaxM3VLForConditionalGeneration`: {NO_REFERENCE}"),
    ProjectorRow("granite4_vision", "Granite 4 Vision", ("Granite4VisionForConditionalGeneration",),
                 "yes (reads a non-negative deepstack hidden-state index as a block number; pairs projectors "
                 "with map entries by sorted order)",
                 ("Granite4VisionForConditionalGeneration",)),
    ProjectorRow("muse-glimmer", "Muse Glimmer", ("MuseGlimmerForConditionalGeneration",),
                 "yes (`MuseGlimmerForConditionalGeneration`'s layout only)",
                 ("MuseGlimmerForConditionalGeneration", "MuseGlimmerModel")),
)

#: the other projector types of clip-impl.h: audio encoders and speech generation (TTS), not
#: vision, so not in the table
AUDIO_PROJECTOR_TYPES: tuple[str, ...] = (
    "gemma3na", "gemma4a", "gemma4ua", "ultravox", "qwen2a", "qwen3a", "glma", "voxtral", "meralion",
    "musicflamingo", "dots3note_a", "lfm2a", "parakeet", "granite_speech", "mimo_audio",
    "qwen3tts_spkenc", "qwen3tts_gen", "pockettts_spkenc", "pockettts_gen",
)

#: vision-language models the installed transformers builds that no converter, legacy script or
#: graph of the installed llama.cpp names: outside the table, listed below it
NOT_IN_LLAMA_CPP: tuple[str, ...] = ("Aya Vision", "Cohere2 Vision", "Ovis2", "Molmo2", "Phi-4-multimodal")
