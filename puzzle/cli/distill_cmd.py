"""``puzzle distill``: global knowledge distillation (GKD) of a child against its parent.

    puzzle distill runs/child --parent smollm2-135m --out runs/gkd                 # 32 steps x 4 x 256 tokens
    puzzle distill runs/child --parent smollm2-135m --out runs/gkd --steps 200 --lr 5e-5 --data corpus/
    puzzle distill runs/child --parent smollm2-135m --out runs/gkd --config gkd.yaml --hidden all
    puzzle export runs/gkd/child --out runs/child-gkd                              # then serve it as DeciLM

Rerunning resumes an interrupted run from its last checkpoint and does nothing on a complete one;
changed inputs are an error unless ``--force``.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="global knowledge distillation of a child against its frozen parent",
                       description="Train every weight of CHILD so that its next-token distributions (KL(parent || "
                       "child)) and hidden states (cosine distance) match the frozen PARENT's, on the train split of "
                       "--data; measure validation KL, top-1 agreement, LM loss and cosine distance before, during "
                       "and after. Writes DIR/child (a runtime model directory), DIR/curve.csv and DIR/manifest.json; "
                       "checkpoints every --checkpoint-every steps and resumes when rerun.")
    p.add_argument("child", metavar="CHILD", help="the child: a runtime or exported DeciLM directory (e.g. "
                   "`puzzle library assemble`, `puzzle export`), a Hugging Face directory or an embedded name")
    p.add_argument("--parent", required=True, metavar="PARENT", help="the parent (teacher): embedded name or "
                   "directory; its tokenizer is used")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to create or resume")
    p.add_argument("--config", metavar="YAML", help="YAML file of GKD settings (keys as in puzzle.distill.GKDConfig); "
                   "flags override it")
    p.add_argument("--data", nargs="+", metavar="SOURCE", help="corpus sources: stdlib, text files, directories, "
                   ".jsonl, .parquet; train split trains, validation split evaluates (default: stdlib)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: 32)")
    p.add_argument("--batch", type=int, help="sequences per optimizer step (default: 4)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward pass, gradients accumulated; "
                   "lowers memory (default: 0, the whole batch)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: 256)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate, warmup then cosine decay (default: 1e-4)")
    p.add_argument("--kl-weight", type=float, help="weight of KL(parent || child) on next-token logits (default: 1)")
    p.add_argument("--cosine-weight", type=float, help="weight of the hidden-state cosine distance (default: 1)")
    p.add_argument("--lm-weight", type=float, help="weight of the child's next-token cross-entropy (default: 0)")
    p.add_argument("--hidden", choices=("final", "all"), help="hidden states the cosine term compares: final (last "
                   "layer's output, before the final norm) or all (every layer; needs --layer-map when the depths "
                   "differ) (default: final)")
    p.add_argument("--layer-map", metavar="C:P,...", help="with --hidden all: pairs of child:parent hidden-state "
                   "indices (0 = embeddings, l = output of layer l), e.g. 1:1,2:3,3:4")
    p.add_argument("--val-sequences", type=int, help="held-out sequences for the validation metrics (default: 8)")
    p.add_argument("--val-every", type=int, help="steps between validations, 0 for only before and after (default: 8)")
    p.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints, 0 for none (default: 8)")
    p.add_argument("--seed", type=int, help="seed of the order of the training sequences (default: 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train: auto uses "
                   "CUDA when present, with bf16 autocast (default: auto)")
    p.add_argument("--force", action="store_true", help="start over even if --out holds a run of other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


FLAGS = ("steps", "batch", "micro_batch", "seq_len", "lr", "kl_weight", "cosine_weight", "lm_weight", "hidden",
         "val_sequences", "val_every", "checkpoint_every", "seed")


def _config(args: argparse.Namespace):  # noqa: ANN202
    from puzzle.distill import GKDConfig

    data = GKDConfig.from_file(args.config).to_dict() if args.config else {}
    data.update({k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None})
    if args.data:
        data["sources"] = list(args.data)
    return GKDConfig.from_dict(data)


def _layer_map(text: str | None) -> list[tuple[int, int]] | None:
    from puzzle.errors import ConfigError

    if not text:
        return None
    try:
        return [(int(c), int(p)) for c, p in (pair.split(":") for pair in text.split(","))]
    except ValueError:
        raise ConfigError(f"--layer-map {text!r}: expected child:parent pairs like 1:1,2:3") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from puzzle.distill import distill_child
    from puzzle.errors import ConfigError, ModelFilesError
    from puzzle.loading import load_model, load_tokenizer, resolve_source

    cfg = _config(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    parent_src, child_src = resolve_source(args.parent), resolve_source(args.child)
    try:
        tokenizer = load_tokenizer(parent_src)
    except ModelFilesError:
        tokenizer = load_tokenizer(child_src)
    parent, child = load_model(parent_src).to(device), load_model(child_src).to(device)
    result = distill_child(child, parent, tokenizer, args.out, cfg, layer_map=_layer_map(args.layer_map),
                           force=args.force, progress=not args.no_progress)
    a, b = result.initial, result.final
    print(f"GKD of {args.child} against {args.parent}: {cfg.steps} steps x {cfg.batch} x {cfg.seq_len} tokens"
          + (" (already complete: nothing ran now)" if result.reused else ""))
    print(f"validation ({cfg.val_sequences} x {cfg.seq_len} tokens): KL {a['kl']:.4f} -> {b['kl']:.4f} nats/token, "
          f"top-1 agreement {a['top1']:.3f} -> {b['top1']:.3f}, cosine distance {a['cos']:.4f} -> {b['cos']:.4f}, "
          f"LM loss {a['lm']:.3f} -> {b['lm']:.3f}")
    print(f"distilled child: {result.directory / 'child'} (curve: {result.directory / 'curve.csv'})")
    return 0
