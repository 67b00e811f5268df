"""Pure tensor codecs and storage geometry, shared by every backend and tool: ggml block sizes
and byte counts (``blocks``), the dtype-name map (``dtypes``), weight dequantization and
quantization bit-exact with ggml (``dequant``, ``quantize``), KV-cache block codecs
(``kv_blocks``), Walsh-Hadamard rotation (``hadamard``), int8 activation quantization
(``act_quant``) and the NVFP4 repack of a loaded model (``repack``). No role objects live here.
"""
