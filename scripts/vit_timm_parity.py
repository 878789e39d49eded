"""Parity of rtloop's ViTs with timm's, on the same random weights. Needs timm (GPU machines have it).

    python scripts/vit_timm_parity.py [--device cuda]

For both OpenVLA backbones: build timm's model as the official code does (`pretrained=False, num_classes=0,
img_size=224`), give every parameter random values (timm's own init leaves LayerScale at 1e-5, which would
hide errors inside the blocks), rename LayerScale `gamma` -> `scale_factor` as the OpenVLA checkpoint does,
load into ours with strict=True (the key-name check against timm itself), and compare our output with
timm's `get_intermediate_layers(x, n={depth - 2})` (the second-to-last block, no norm, prefix dropped).
Prints one JSON report on stdout; exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rtloop.policy.config import vit_args_for  # noqa: E402
from rtloop.policy.vit import VisionTransformer  # noqa: E402

MODELS = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
FP32_ATOL = 1e-3  # outputs are O(1); fp32 differences come from attention/GEMM kernel choice
BF16_REL = 0.05  # bf16 runs of both are compared relative to the fp32 output's scale


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            values = torch.rand(p.shape, generator=g) * 0.2 + 0.05
        elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
            values = torch.rand(p.shape, generator=g) + 0.5
        else:
            values = torch.randn(p.shape, generator=g) * 0.02
        p.copy_(values)


def check(timm_id: str, device: str) -> dict:
    import timm

    theirs = timm.create_model(timm_id, pretrained=False, num_classes=0, img_size=224).eval()
    randomize_(theirs, seed=0)
    state = {k.replace(".gamma", ".scale_factor"): v for k, v in theirs.state_dict().items()}
    ours = VisionTransformer(vit_args_for(timm_id, 224, None)).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    report = {
        "timm_model_id": timm_id,
        "timm_act": repr(theirs.blocks[0].mlp.act),
        "our_act": repr(ours.blocks[0].mlp.act),
        "n_keys_timm": len(state),
        "missing_in_timm": sorted(missing)[:5],
        "unexpected_from_timm": sorted(unexpected)[:5],
    }
    theirs.to(device)
    ours.to(device)
    depth = len(theirs.blocks)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        want = theirs.get_intermediate_layers(pixels, n={depth - 2})[0]
        got = ours(pixels)
        scale = want.abs().max().item()
        report["shape"] = list(got.shape)
        report["fp32_max_abs_diff"] = (got - want).abs().max().item()
        report["fp32_output_max_abs"] = scale
        theirs.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        want16 = theirs.get_intermediate_layers(pixels.bfloat16(), n={depth - 2})[0].float()
        got16 = ours(pixels.bfloat16()).float()
        report["bf16_max_abs_diff_ours_vs_timm"] = (got16 - want16).abs().max().item()
        report["bf16_timm_vs_fp32_timm_max_abs_diff"] = (want16 - want).abs().max().item()
    report["ok"] = bool(
        not missing and not unexpected
        and list(got.shape) == [2, 256, ours.args.width]
        and report["fp32_max_abs_diff"] < FP32_ATOL
        and report["bf16_max_abs_diff_ours_vs_timm"] < BF16_REL * scale
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    import timm

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    reports = [check(m, args.device) for m in MODELS]
    result = {"timm_version": timm.__version__, "torch_version": torch.__version__, "device": args.device,
              "fp32_atol": FP32_ATOL, "bf16_rel": BF16_REL, "models": reports, "ok": all(r["ok"] for r in reports)}
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
