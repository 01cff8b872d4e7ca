"""Export of a runtime model to the DeciLM / nemotron-nas checkpoint format."""

from puzzle.export.decilm import export_decilm, ffn_mult_for

__all__ = ["export_decilm", "ffn_mult_for"]
