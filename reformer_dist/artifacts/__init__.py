"""Model artifacts on disk: the formats a trained model is stored in and how a path is resolved to one.

- ``model_source``: ``load_model(path)`` for a run, native or Hugging Face directory, and ``model_name``;
- ``native``: the native directory (safetensors + config.yaml + tokenizer spec) training consolidates to;
- ``hf_checkpoint``: Hugging Face Reformer directories (the mapping itself is ``model.hf_mapping``);
- ``tokenizer_spec``: the tokenizer a model records, in native and HF directories and graph metadata;
- ``files``: the checked readers they share (JSON objects, safetensors, paths inside a directory).

Artifacts depend on the model and the tokenizers only; export, serving, decoding, the commands and
training's consolidation import them.
"""
