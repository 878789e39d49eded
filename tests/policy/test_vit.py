"""ViTs: timm's parameter names and shapes at the real sizes (built on `meta`, no memory), and the
second-to-last-block output OpenVLA uses. Numerical parity with timm itself: scripts/vit_timm_parity.py
(timm is not installed on CPU machines)."""

import pytest
import torch

from rtloop.policy.config import TIMM_VIT_ARGS, VitArgs, vit_args_for
from rtloop.policy.vit import VisionTransformer

BLOCK_KEYS = [
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]
ATTN_POOL_KEYS = [
    "attn_pool.latent", "attn_pool.q.weight", "attn_pool.q.bias", "attn_pool.kv.weight", "attn_pool.kv.bias",
    "attn_pool.proj.weight", "attn_pool.proj.bias", "attn_pool.norm.weight", "attn_pool.norm.bias",
    "attn_pool.mlp.fc1.weight", "attn_pool.mlp.fc1.bias", "attn_pool.mlp.fc2.weight", "attn_pool.mlp.fc2.bias",
]
STEM_KEYS = ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]


def _meta_state(timm_id: str) -> dict[str, torch.Size]:
    with torch.device("meta"):
        vit = VisionTransformer(vit_args_for(timm_id, 224, None))
    return {k: v.shape for k, v in vit.state_dict().items()}


def test_dinov2_reg4_keys_and_shapes():
    state = _meta_state("vit_large_patch14_reg4_dinov2.lvd142m")
    expected = {"cls_token", "reg_token", *STEM_KEYS}
    for i in range(24):
        expected |= {f"blocks.{i}.{k}" for k in BLOCK_KEYS + ["ls1.scale_factor", "ls2.scale_factor"]}
    assert set(state) == expected
    assert state["cls_token"] == (1, 1, 1024)
    assert state["reg_token"] == (1, 4, 1024)
    assert state["pos_embed"] == (1, 256, 1024)  # no_embed_class: patches only, none for CLS/registers
    assert state["patch_embed.proj.weight"] == (1024, 3, 14, 14)
    assert state["blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert state["blocks.0.mlp.fc1.weight"] == (4096, 1024)
    assert state["blocks.0.ls1.scale_factor"] == (1024,)
    assert sum(s.numel() for s in state.values()) == 303_230_976  # counted by hand from the shapes above


def test_siglip_so400m_keys_and_shapes():
    state = _meta_state("vit_so400m_patch14_siglip_224")
    expected = {*STEM_KEYS, *ATTN_POOL_KEYS}
    for i in range(27):
        expected |= {f"blocks.{i}.{k}" for k in BLOCK_KEYS}
    assert set(state) == expected
    assert state["pos_embed"] == (1, 256, 1152)
    assert state["blocks.0.mlp.fc1.weight"] == (4304, 1152)
    assert state["attn_pool.latent"] == (1, 1, 1152)
    assert state["attn_pool.kv.weight"] == (2304, 1152)
    assert state["attn_pool.mlp.fc1.weight"] == (4304, 1152)
    assert sum(s.numel() for s in state.values()) == 427_680_704  # counted by hand, attn_pool included


def test_real_backbone_args():
    dino, siglip = TIMM_VIT_ARGS["vit_large_patch14_reg4_dinov2"], TIMM_VIT_ARGS["vit_so400m_patch14_siglip_224"]
    assert (dino.width, dino.depth, dino.heads, dino.mlp_dim, dino.num_prefix_tokens) == (1024, 24, 16, 4096, 5)
    assert (siglip.width, siglip.depth, siglip.heads, siglip.mlp_dim, siglip.num_prefix_tokens) == (1152, 27, 16, 4304, 0)
    assert dino.act == siglip.act == "gelu"  # timm registers neither with gelu_tanh
    assert vit_args_for("vit_so400m_patch14_siglip_224", 224, "gelu_tanh").act == "gelu_tanh"


TINY = VitArgs(width=32, depth=3, heads=2, mlp_dim=64, class_token=True, reg_tokens=4, no_embed_class=True,
               layerscale=True)


def _tiny_vit(args: VitArgs = TINY, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(args).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0.0, 0.2)
    return vit


def _timm_style_reference(vit: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """timm's `get_intermediate_layers(x, n={depth - 2})` written out from its source: patch embed,
    `_pos_embed` (no_embed_class: add to patches, then prepend CLS and registers), every block up to index
    depth-2, no final norm, prefix tokens dropped."""
    a = vit.args
    x = vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
    B = x.shape[0]
    x = x + vit.pos_embed
    x = torch.cat([vit.cls_token.expand(B, -1, -1), vit.reg_token.expand(B, -1, -1), x], dim=1)
    for i, block in enumerate(vit.blocks):
        x = block(x)
        if i == a.depth - 2:
            return x[:, a.num_prefix_tokens:]


@torch.no_grad()
def test_second_to_last_block_output():
    vit = _tiny_vit()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    out = vit(pixels)
    assert out.shape == (2, 256, 32)
    # float32, one summation order apart: our patch embedding is a matmul, timm's the convolution
    torch.testing.assert_close(out, _timm_style_reference(vit, pixels), rtol=1e-5, atol=1e-4)

    # the last block and the final norm do not matter; the second-to-last block does
    vit.blocks[-1].mlp.fc2.weight.add_(1.0)
    vit.norm.weight.add_(1.0)
    assert torch.equal(vit(pixels), out)
    vit.blocks[-2].mlp.fc2.weight.add_(1.0)
    assert not torch.allclose(vit(pixels), out)


@torch.no_grad()
def test_prefix_tokens_attend_but_are_dropped():
    vit = _tiny_vit()
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    out = vit(pixels)
    # registers are attended to, so the patch outputs change (a random change: LayerNorm removes a constant)
    vit.reg_token.add_(torch.randn(vit.reg_token.shape, generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(vit(pixels), out)


@torch.no_grad()
def test_siglip_layout_has_no_prefix_and_pos_embed_on_every_token():
    args = VitArgs(width=48, depth=3, heads=2, mlp_dim=96, class_token=False, attn_pool=True)
    vit = _tiny_vit(args)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    out = vit(pixels)
    assert out.shape == (1, 256, 48)
    vit.attn_pool.q.weight.add_(1.0)  # the MAP head is stored but never run
    assert torch.equal(vit(pixels), out)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_activation_choice(act):
    vit = VisionTransformer(VitArgs(width=8, depth=2, heads=2, mlp_dim=8, act=act))
    assert vit.blocks[0].mlp.act.approximate == ("tanh" if act == "gelu_tanh" else "none")
