"""Library configs of the block-library tests (the tiny text parent is in tests/conftest.py)."""

from __future__ import annotations

from block_library import LibraryConfig


def tiny_config(**bld) -> LibraryConfig:
    """FFN widths in multiples of 16 (the parent is 96 wide), 64-token sequences, a few steps."""
    return LibraryConfig.from_dict({
        "space": {"ffn": {"multiple": 16}},
        "bld": {"tokens": 1024, "batch_size": 2, "calib_sequences": 4, "val_sequences": 4,
                "checkpoint_every": 2, "lr": 1e-3, **bld},
        "data": {"seq_len": 64},
    })
