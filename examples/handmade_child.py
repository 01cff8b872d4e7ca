"""A heterogeneous child by hand: remove attention from some layers of SmolLM2-135M, export it.

    python examples/handmade_child.py [--drop-attention 20 22 24 26] [--out /tmp/child]

The block library (BLD) will build far better children; this shows the runtime and export on
the real parent: a child whose no-op sub-blocks simply drop the parent's weights, its quality
against the parent on held-out stdlib text, and a DeciLM export that vLLM-style engines read.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from puzzle.data import load_sequences
from puzzle.export import export_decilm
from puzzle.loading import load_model, load_tokenizer, resolve_source
from puzzle.model.weights import model_from_state_dict
from puzzle.schema import AttentionConfig, BlockConfig
from puzzle.summary import totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drop-attention", type=int, nargs="*", default=[20, 22, 24, 26], help="layers whose attention becomes no-op")
    ap.add_argument("--sequences", type=int, default=8, help="held-out sequences of 128 tokens to score on")
    ap.add_argument("--out", default=None, help="export directory (default: a temporary one)")
    args = ap.parse_args()

    source = resolve_source("smollm2-135m")
    parent, tokenizer = load_model(source), load_tokenizer(source)

    # The child's architecture: the parent's blocks with some attention sub-blocks removed.
    blocks = [
        BlockConfig(attention=AttentionConfig.no_op(), ffn=b.ffn) if i in args.drop_attention else b
        for i, b in enumerate(parent.config.blocks)
    ]
    child_config = parent.config.with_blocks(blocks)
    # A no-op sub-block has no weights and no norm: keep every parent tensor the child still has.
    dropped = tuple(f"model.layers.{i}.{part}" for i in args.drop_attention for part in ("self_attn.", "input_layernorm."))
    state = {k: v for k, v in parent.state_dict().items() if not k.startswith(dropped) and k != "lm_head.weight"}
    child = model_from_state_dict(child_config, state)

    ids = load_sequences(["stdlib"], tokenizer, seq_len=128, num_sequences=args.sequences, split="validation")
    with torch.no_grad():
        p_logits, c_logits = parent(ids, use_cache=False).logits, child(ids, use_cache=False).logits
    kl = F.kl_div(c_logits.log_softmax(-1), p_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    agree = (c_logits.argmax(-1) == p_logits.argmax(-1)).float().mean()
    tp, tc = totals(parent.config), totals(child_config)
    print(f"parent: {tp.params / 1e6:.2f}M params, KV {tp.kv_bytes_per_token} B/token")
    print(f"child : {tc.params / 1e6:.2f}M params, KV {tc.kv_bytes_per_token} B/token, "
          f"attention removed from layers {args.drop_attention}")
    print(f"child vs parent on {ids.numel()} held-out tokens: KL {kl:.4f} nats/token, top-1 agreement {agree:.1%}")

    out = args.out or tempfile.mkdtemp(prefix="puzzle-child-")
    export_decilm(child, f"{out}/deci", source_dir=source.directory)
    reloaded = load_model(f"{out}/deci")
    with torch.no_grad():
        same = torch.equal(reloaded(ids[:1], use_cache=False).logits, child(ids[:1], use_cache=False).logits)
    print(f"exported to {out}/deci; reload is exact: {same}")


if __name__ == "__main__":
    main()
