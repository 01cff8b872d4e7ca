"""Export of a runtime model to the DeciLM / nemotron-nas checkpoint format.

    export_decilm(model, out_dir, source_dir=parent_dir)     # an in-memory model
    export_decilm_dir(model_dir, out_dir)                     # streamed from a model directory
"""

from puzzle.export.decilm import export_decilm, export_decilm_dir, ffn_mult_for

__all__ = ["export_decilm", "export_decilm_dir", "ffn_mult_for"]
