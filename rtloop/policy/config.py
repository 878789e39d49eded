"""OpenVLA configuration: `config.json` of a checkpoint directory, read into plain dataclasses.

The official loader builds the Llama config as `LlamaConfig(**text_config)`, so any field the file leaves out
takes transformers' LlamaConfig default; `LlamaArgs` carries the same defaults. The two ViTs are named by timm
model ids; their shapes live in `TIMM_VIT_ARGS`. Checkpoints made by `rtloop checkpoint make --size tiny`
store their (small) ViT shapes in the extra field `rtloop_vit_args`, so loading stays one code path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rtloop.errors import CheckpointError


@dataclass
class LlamaArgs:
    """The fields of a Hugging Face Llama `text_config` the decoder needs (defaults: transformers' LlamaConfig)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA), as in LlamaConfig
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_text_config(cls, text_config: dict[str, Any]) -> LlamaArgs:
        known = {f.name for f in fields(cls)}
        args = {k: v for k, v in text_config.items() if k in known}
        # transformers >= 5 writes rope_theta inside rope_parameters
        rope = text_config.get("rope_parameters") or {}
        if "rope_theta" not in args and "rope_theta" in rope:
            args["rope_theta"] = rope["rope_theta"]
        return cls(**args)


@dataclass
class VitArgs:
    """One timm VisionTransformer, as far as OpenVLA uses it."""

    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int = 14
    image: int = 224
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False  # True: pos_embed covers the patches only (DINOv2 with registers)
    layerscale: bool = False  # DINOv2: per-channel scale after attention and MLP (`ls1`, `ls2`)
    attn_pool: bool = False  # SigLIP: a MAP head (`attn_pool.*`); stored in the checkpoint, never run
    act: str = "gelu"  # "gelu" (exact, erf) or "gelu_tanh"
    eps: float = 1e-6

    @property
    def num_patches(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


# The two backbones of OpenVLA-7B, as timm 0.9.10 builds them with `img_size=224, num_classes=0`.
# SigLIP So400m/14-224 uses timm's default exact GELU: timm registers `act_layer='gelu_tanh'` only for other
# SigLIP variants, and OpenVLA's `timm_override_act_layers` is [null, null].
TIMM_VIT_ARGS: dict[str, VitArgs] = {
    "vit_large_patch14_reg4_dinov2": VitArgs(
        width=1024, depth=24, heads=16, mlp_dim=4096, class_token=True, reg_tokens=4,
        no_embed_class=True, layerscale=True,
    ),
    "vit_so400m_patch14_siglip_224": VitArgs(
        width=1152, depth=27, heads=16, mlp_dim=4304, class_token=False, attn_pool=True,
    ),
}

# config.json's `image_resize_strategy` values rtloop implements (rtloop.policy.processor.pixel_values). The
# official processor also knows "resize-crop" and "letterbox"; no released OpenVLA checkpoint uses them.
RESIZE_STRATEGIES = ("resize-naive",)

# timm's names for the activations `timm_override_act_layers` may name; both are what nn.GELU offers.
ACT_OVERRIDES = {"gelu": "gelu", "gelu_tanh": "gelu_tanh"}


def vit_args_for(timm_model_id: str, image_size: int, act_override: str | None) -> VitArgs:
    base = timm_model_id.split(".")[0]  # drop the pretrained tag, e.g. ".lvd142m"
    if base not in TIMM_VIT_ARGS:
        raise CheckpointError(
            f"unsupported vision backbone {timm_model_id!r}; supported: {', '.join(sorted(TIMM_VIT_ARGS))}"
        )
    args = VitArgs(**asdict(TIMM_VIT_ARGS[base]))
    args.image = image_size
    if act_override is not None:
        if act_override not in ACT_OVERRIDES:
            raise CheckpointError(f"unsupported timm_override_act_layers entry {act_override!r}")
        args.act = ACT_OVERRIDES[act_override]
    return args


@dataclass
class OpenVLAConfig:
    """A checkpoint's `config.json`. `raw` keeps every field verbatim."""

    vision_backbone_id: str
    llm_backbone_id: str
    arch_specifier: str
    use_fused_vision_backbone: bool
    image_sizes: list[int]
    timm_model_ids: list[str]
    timm_override_act_layers: list[str | None]
    image_resize_strategy: str
    llm_max_length: int
    pad_token_id: int
    pad_to_multiple_of: int
    n_action_bins: int
    norm_stats: dict[str, Any]
    text_config: dict[str, Any]
    llm: LlamaArgs
    vits: list[VitArgs]  # [DINOv2 (featurizer), SigLIP (fused_featurizer)]
    norm_stats_file: str  # where norm_stats came from: config.json, or a dataset_statistics.json beside it
    raw: dict[str, Any] = field(repr=False)

    @property
    def vision_dim(self) -> int:
        return sum(v.width for v in self.vits)

    @property
    def num_patches(self) -> int:
        return self.vits[0].num_patches

    @property
    def generated(self) -> dict[str, Any] | None:
        """`{"size", "seed", "random_weights"}` for checkpoints made by `rtloop checkpoint make`, else None."""
        return self.raw.get("rtloop_generated")

    @classmethod
    def from_dict(cls, d: dict[str, Any], norm_stats_file: str = "config.json") -> OpenVLAConfig:
        try:
            resize = d.get("image_resize_strategy", "resize-naive")
            if resize not in RESIZE_STRATEGIES:
                raise CheckpointError(f"config.json: image_resize_strategy {resize!r} is not implemented; "
                                      f"rtloop supports {', '.join(map(repr, RESIZE_STRATEGIES))}")
            if not d["use_fused_vision_backbone"] or len(d["timm_model_ids"]) != 2:
                raise CheckpointError("only the fused DINOv2 + SigLIP vision backbone of OpenVLA is supported")
            if not d["arch_specifier"].endswith("fused-gelu-mlp"):
                raise CheckpointError(f"unsupported projector {d['arch_specifier']!r}; expected *fused-gelu-mlp")
            image_sizes = list(d["image_sizes"])
            acts = list(d.get("timm_override_act_layers") or [None, None])
            if "rtloop_vit_args" in d:
                vits = [VitArgs(**v) for v in d["rtloop_vit_args"]]
            else:
                vits = [vit_args_for(m, s, a) for m, s, a in zip(d["timm_model_ids"], image_sizes, acts)]
            if vits[0].num_patches != vits[1].num_patches:
                raise CheckpointError("the two vision backbones must produce the same number of patches")
            text_config = dict(d.get("text_config") or {})
            return cls(
                vision_backbone_id=d["vision_backbone_id"],
                llm_backbone_id=d["llm_backbone_id"],
                arch_specifier=d["arch_specifier"],
                use_fused_vision_backbone=True,
                image_sizes=image_sizes,
                timm_model_ids=list(d["timm_model_ids"]),
                timm_override_act_layers=acts,
                image_resize_strategy=resize,
                llm_max_length=d.get("llm_max_length", 2048),
                pad_token_id=d.get("pad_token_id", 32000),
                pad_to_multiple_of=d.get("pad_to_multiple_of", 64),
                n_action_bins=d.get("n_action_bins", 256),
                norm_stats=d.get("norm_stats") or {},
                text_config=text_config,
                llm=LlamaArgs.from_text_config(text_config),
                vits=vits,
                norm_stats_file=norm_stats_file,
                raw=d,
            )
        except KeyError as e:
            raise CheckpointError(f"config.json lacks the field {e.args[0]!r}") from None
        except TypeError as e:
            raise CheckpointError(f"config.json has a malformed field: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> OpenVLAConfig:
        """Read `config.json`; a `dataset_statistics.json` beside it replaces norm_stats (as the official loader does)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file} is missing")
        d = _read_json(config_file)
        stats_file = path / "dataset_statistics.json"
        if stats_file.is_file():
            d["norm_stats"] = _read_json(stats_file)
            return cls.from_dict(d, str(stats_file))
        return cls.from_dict(d, str(config_file))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return d
