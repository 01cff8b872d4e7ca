"""Run in a subprocess: load an export with trust_remote_code while puzzle is NOT importable.

Usage: python remote_load.py EXPORT_DIR IDS.safetensors OUT.safetensors
Writes the logits for the given ids and, as a check, the names of any puzzle modules imported.
"""

import importlib.abc
import sys


class _BlockProjectImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("puzzle", "block_library", "solvers", "tests"):
            raise ImportError(f"{name} must not be importable when loading an export")
        return None


sys.meta_path.insert(0, _BlockProjectImports())
sys.path = [p for p in sys.path if p not in ("", ".")]

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

export_dir, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
ids = load_file(ids_file)["ids"]
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids[:1, :6], max_new_tokens=10, do_sample=False)
assert type(model).__name__ == "DeciLMForCausalLM", type(model)
assert not [m for m in sys.modules if m.split(".")[0] == "puzzle"]
save_file({"logits": logits.contiguous(), "generated": generated.contiguous()}, out_file)
print("ok", type(model).__module__)
