"""puzzle: distillation-based NAS that turns a Llama-family parent into a faster heterogeneous child."""

__version__ = "0.1.0"
