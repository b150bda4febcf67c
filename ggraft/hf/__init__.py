"""Layer 1: reading Hugging Face (and Mistral native) checkpoints: config files and
memory-mapped safetensors, tensor by tensor.  Pickle checkpoints are refused here.  Config values
are validated where they are read (``config_values``): a bad one is one line naming the file, the
key and what was expected."""
