"""Per-layer block variants and block-wise local distillation (BLD). See issue 3; not built yet."""
