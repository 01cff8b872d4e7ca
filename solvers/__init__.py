"""Mixed-integer programs that pick one block variant per layer (pure Python; never imports torch)."""
