"""`rtloop checkpoint`: make a random-weight OpenVLA checkpoint directory, or inspect one.

    rtloop checkpoint make --size tiny --out weights/openvla-tiny [--seed 0]
    rtloop checkpoint inspect weights/openvla-7b
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    make = sub.add_parser("make", help="write a random-weight checkpoint in the official on-disk format")
    make.add_argument("--size", choices=["tiny", "7b"], required=True,
                      help="tiny: CPU-test sized (~4M params, fp32); 7b: full OpenVLA-7B shapes, bf16 (~15 GB)")
    make.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    make.add_argument("--seed", type=int, default=0)
    inspect = sub.add_parser("inspect", help="print a checkpoint's config summary and norm_stats keys")
    inspect.add_argument("dir", help="checkpoint directory")


def _make(args) -> int:
    from rtloop.clock import now
    from rtloop.policy.checkpoint import make_checkpoint

    start = now()
    out = make_checkpoint(args.size, args.out, seed=args.seed)
    print(f"wrote {args.size} checkpoint (random weights, seed {args.seed}) to {out} in {now() - start:.1f} s")
    return 0


def _inspect(args) -> int:
    """Reads no weights: the shard headers are checked against the file sizes and the index (total_size
    included), every dataset's action statistics against OpenVLA's 7 dimensions."""
    from pathlib import Path

    from rtloop.policy.actions import check_action_stats
    from rtloop.policy.checkpoint import INDEX_FILE, checked_headers
    from rtloop.policy.config import OpenVLAConfig

    headers = checked_headers(Path(args.dir), check_total_size=True)
    files = [h.path for h in headers]
    checked = "the file sizes and the index" if (Path(args.dir) / INDEX_FILE).is_file() else "the file size"
    c = OpenVLAConfig.from_dir(args.dir)
    for key, stats in sorted(c.norm_stats.items()):
        check_action_stats(stats, f"{c.norm_stats_file}, key {key!r}")
    llm = c.llm
    generated = c.generated
    origin = (f"RANDOM WEIGHTS made by rtloop (size {generated['size']}, seed {generated['seed']})"
              if generated else "external checkpoint")
    lines = [
        f"checkpoint: {args.dir} ({origin})",
        f"weights: {len(files)} file(s), {sum(f.stat().st_size for f in files) / 1e9:.3f} GB, "
        f"{sum(len(h.shapes) for h in headers)} tensors (headers match {checked})",
        f"vision: {' + '.join(c.timm_model_ids)}, images {c.image_sizes} ({c.image_resize_strategy}), "
        f"{c.num_patches} patches",
    ]
    for name, v in zip(("featurizer", "fused_featurizer"), c.vits):
        lines.append(f"  {name}: width {v.width}, depth {v.depth}, heads {v.heads}, mlp {v.mlp_dim}, "
                     f"prefix tokens {v.num_prefix_tokens}, act {v.act}")
    lines += [
        f"projector: {c.arch_specifier}: {c.vision_dim} -> {4 * c.vision_dim} -> {llm.hidden_size} -> {llm.hidden_size}",
        f"llm: {c.llm_backbone_id}: hidden {llm.hidden_size}, layers {llm.num_hidden_layers}, "
        f"heads {llm.num_attention_heads} (kv {llm.num_key_value_heads}), mlp {llm.intermediate_size}, "
        f"vocab {llm.vocab_size}",
        f"actions: {c.n_action_bins} bins, pad_to_multiple_of {c.pad_to_multiple_of}",
        f"norm_stats keys ({Path(c.norm_stats_file).name}, 7-dim actions): {', '.join(sorted(c.norm_stats)) or '(none)'}",
    ]
    print("\n".join(lines))
    return 0


def main(args) -> int:
    return _make(args) if args.action == "make" else _inspect(args)
