"""luce_gguf: the GGUF loader role (memory-mapped tensors, llama/qwen2/qwen3 configs), the GGUF
tokenizer and chat template, and writers of benchmark models (random, or a real model widened).

Modules: plugin (descriptor, light), loader (the role object), reader (parsing, QTensor views,
fingerprint), arch (ModelConfig and expected tensors), tokenizer, chat, quants (float <-> ggml
bytes), writer (streaming GGUF writing, rewrite_gguf), synth (random models, CLI), widen
(a model padded to a larger shape computing the same tokens, CLI), hf_oracle (the same model in
transformers).
"""
