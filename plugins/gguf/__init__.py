"""luce_gguf: the GGUF loader role (memory-mapped tensors, llama/qwen2/qwen3 configs), the GGUF
tokenizer and chat template, and a synthetic GGUF writer for tests and benchmarks.

Modules: plugin (descriptor, light), loader (the role object), reader (parsing, QTensor views,
fingerprint), arch (ModelConfig and expected tensors), tokenizer, chat, quants (float <-> ggml
bytes), writer (streaming GGUF writing, rewrite_gguf), synth (random models, CLI), hf_oracle
(the same model in transformers).
"""
