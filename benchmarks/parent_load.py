"""Parent loading and runtime fidelity on the embedded SmolLM2-135M.

    python benchmarks/parent_load.py [--quick]

Measures: the first load (GGUF -> safetensors cache conversion, in a fresh temporary cache),
the cached load, the max |logit| difference against transformers reading the same GGUF, and
CPU prefill / greedy-decode speed of the runtime next to transformers' LlamaForCausalLM.
Prints a table and writes benchmarks/results/parent_load.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "parent_load.csv"


def _timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and shorter sequences (under a minute)")
    args = ap.parse_args(argv)
    repeats, prompt_len, new_tokens = (2, 128, 16) if args.quick else (5, 512, 64)

    from transformers import AutoModelForCausalLM

    from puzzle.loading import load_model, load_tokenizer, resolve_source
    from puzzle.parents.embedded import EMBEDDED, gguf_path

    rows = []
    device = f"cpu ({torch.get_num_threads()} threads)"

    def add(metric: str, value: float, unit: str) -> None:
        rows.append({"metric": metric, "model": "smollm2-135m", "device": device, "value": round(value, 6), "unit": unit})

    with tempfile.TemporaryDirectory() as cache:  # cold: convert the GGUF into an empty cache
        old = os.environ.get("PUZZLE_CACHE_DIR")
        os.environ["PUZZLE_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        load_model(resolve_source("smollm2-135m"))
        add("first_load_with_conversion", time.perf_counter() - t0, "s")
        if old is None:
            del os.environ["PUZZLE_CACHE_DIR"]
        else:
            os.environ["PUZZLE_CACHE_DIR"] = old

    src = resolve_source("smollm2-135m")  # the user cache, converted if needed
    model, tok = load_model(src), load_tokenizer(src)
    add("cached_load", _timed(lambda: load_model(resolve_source("smollm2-135m")), repeats), "s")
    few = tok("import os", return_tensors="pt").input_ids
    with torch.no_grad():  # weights are read lazily from the page cache: include a first forward
        first = _timed(lambda: load_model(resolve_source("smollm2-135m"))(few, use_cache=False), repeats)
    add("cached_load_to_first_logits", first, "s")
    path = gguf_path(EMBEDDED["smollm2-135m"])
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    text = Path(os.__file__).read_text()[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :prompt_len]
    with torch.no_grad():
        add("max_abs_logit_diff_vs_transformers", (ref(ids).logits - model(ids).logits).abs().max().item(), "")
        for name, m in (("puzzle", model), ("transformers", ref)):
            s = _timed(lambda m=m: m(ids, use_cache=False), repeats)
            add(f"prefill_tokens_per_s[{name}]", prompt_len / s, "tok/s")
            prompt = ids[:, :32]
            s = _timed(lambda m=m: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                              do_sample=False), repeats)
            add(f"decode_tokens_per_s[{name}]", new_tokens / s, "tok/s")

    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(RESULTS, index=False)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
