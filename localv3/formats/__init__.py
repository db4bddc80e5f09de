"""Weight formats: the one format table (table), block-quantised weights and their torch
dequantisers (blocks), ggml's CPU kernels through its C API (ggml), and the torch modules that
compute with them (modules)."""
