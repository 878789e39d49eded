"""OpenVLA checkpoint directories: load one, or make one with random weights in the same on-disk format.

A checkpoint directory (the Hugging Face layout of `openvla/openvla-7b`) holds `config.json`, the weights as
`*.safetensors` (sharded with `model.safetensors.index.json`, or one `model.safetensors`), the tokenizer files
and optionally `dataset_statistics.json` (which then replaces `norm_stats`).

Loading builds the model on the `meta` device and assigns the tensors read from disk (`assign=True`): no
second copy of the weights is ever allocated, and with `dtype` each tensor is cast as it is read.

Random checkpoints (`make_checkpoint`, `build_random_model`) carry the real key names, the real config fields
(`text_config.vocab_size` 32064 for both sizes: the action-token mapping depends on it) and LIBERO-like and
Bridge-like `norm_stats`. They also bias `lm_head` towards the 256 action tokens (see
`_favour_action_tokens_`), so that a random model usually emits action tokens; real checkpoints have no
such bias, and nothing in the loader knows about it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtloop.errors import CheckpointError
from rtloop.policy.config import OpenVLAConfig
from rtloop.policy.linear import fuse_checkpoint_state_
from rtloop.policy.model import OpenVLA

REQUIRED_FILES = ("config.json", "tokenizer.model")  # plus the weights: *.safetensors (see weight_files)
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 2_000_000_000  # Hugging Face's "2GB" shard limit
SIZES = ("tiny", "7b")


@dataclass
class LoadedCheckpoint:
    config: OpenVLAConfig
    model: OpenVLA
    path: Path


# ---------------------------------------------------------------------------------------------- loading


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; a one-line CheckpointError naming what is missing."""
    index = path / INDEX_FILE
    if index.is_file():
        files = [path / name for name in sorted(set(read_index(path)["weight_map"].values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"weight shard {f} named in {INDEX_FILE} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no weight files (*.safetensors) in {path}")
    return files


def read_index(path: Path) -> dict[str, Any]:
    index = path / INDEX_FILE
    try:
        d = json.loads(index.read_text())
        if not isinstance(d["weight_map"], dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index} is not a safetensors index (no weight_map)") from None
    return d


# bytes per element of the safetensors dtypes; a dtype not listed here skips the per-tensor size check
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass
class ShardHeader:
    path: Path
    shapes: dict[str, list[int]]  # tensor name -> shape
    tensor_bytes: int  # the data section the header describes


def read_shard_header(f: Path) -> ShardHeader:
    """A safetensors file's header (8-byte little-endian length, then JSON), checked against the file's size
    without reading the tensors: a truncated or padded file, or a damaged header, is a one-line
    CheckpointError naming the file."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else None
        if n is None or n > size - 8:
            raise CheckpointError(f"weight shard {f} is truncated or not a safetensors file "
                                  f"({size} bytes, shorter than the header it announces)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, ValueError):
            raise CheckpointError(f"weight shard {f} has an unreadable safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"weight shard {f} has an unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    shapes, end = {}, 0
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"weight shard {f}: malformed header entry for {name!r}") from None
        itemsize = SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and stop - start != math.prod(shape) * itemsize:
            raise CheckpointError(f"weight shard {f}: the header gives {name} {dtype} {shape} "
                                  f"({math.prod(shape) * itemsize} bytes) a span of {stop - start} bytes")
        shapes[name], end = shape, max(end, stop)
    data = size - 8 - n
    if data < end:
        raise CheckpointError(f"weight shard {f} is truncated: its header describes {8 + n + end} bytes, "
                              f"the file has {size}")
    if data > end:
        raise CheckpointError(f"weight shard {f} has {data - end} bytes past the tensors its header describes")
    return ShardHeader(f, shapes, end)


def read_weight_headers(path: Path, files: list[Path], check_total_size: bool = False) -> list[ShardHeader]:
    """Every shard's header, and (sharded checkpoints) each against the index: every tensor the index maps
    to a shard is in that shard's header, and no shard holds a tensor the index does not list.
    `check_total_size` also compares the index's `metadata.total_size` with the tensor bytes (inspect does;
    loading needs only the keys and shapes)."""
    headers = [read_shard_header(f) for f in files]
    seen: dict[str, Path] = {}
    for h in headers:
        for name in h.shapes:
            if name in seen:
                raise CheckpointError(f"tensor {name} is stored twice: in {seen[name].name} and {h.path.name}")
            seen[name] = h.path
    if not (path / INDEX_FILE).is_file():
        return headers
    index = read_index(path)
    for name, shard in index["weight_map"].items():
        if name not in seen:
            raise CheckpointError(f"{INDEX_FILE} maps {name} to {shard}, whose header does not have it")
        if seen[name].name != shard:
            raise CheckpointError(f"{INDEX_FILE} maps {name} to {shard}, but it is in {seen[name].name}")
    unlisted = sorted(seen.keys() - index["weight_map"].keys())
    if unlisted:
        raise CheckpointError(f"{seen[unlisted[0]]} holds {len(unlisted)} tensor(s) {INDEX_FILE} does not "
                              f"list (e.g. {unlisted[0]})")
    total = (index.get("metadata") or {}).get("total_size")
    stored = sum(h.tensor_bytes for h in headers)
    if check_total_size and total is not None and total != stored:
        raise CheckpointError(f"{INDEX_FILE} gives total_size {total} bytes; the shards' headers describe {stored}")
    return headers


def check_checkpoint_dir(path: str | Path) -> list[Path]:
    """Validate a checkpoint directory without reading weights (the files, the shard headers against the
    file sizes and the index); return its weight files."""
    return [h.path for h in checked_headers(Path(path))]


def checked_headers(path: Path, check_total_size: bool = False) -> list[ShardHeader]:
    """check_checkpoint_dir's checks; the shard headers they read."""
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    return read_weight_headers(path, weight_files(path), check_total_size)


def _key_problems(expected: dict[str, torch.Size], found: dict[str, list[int]]) -> str | None:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        return "weights do not match the OpenVLA layout of config.json: " + "; ".join(parts)
    wrong = [k for k in sorted(expected) if list(expected[k]) != list(found[k])]
    if wrong:
        k = wrong[0]
        return (f"{len(wrong)} weights have the wrong shape for config.json (e.g. {k}: "
                f"file {list(found[k])}, config {list(expected[k])})")
    return None


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedCheckpoint:
    """Load config and weights -> LoadedCheckpoint. dtype None keeps the stored dtype (bfloat16 for 7b)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    headers = checked_headers(path)
    config = OpenVLAConfig.from_dir(path)
    with torch.device("meta"):
        model = OpenVLA(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    shapes = {k: v for h in headers for k, v in h.shapes.items()}
    problem = _key_problems(expected, shapes)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    state = {}
    for f in (h.path for h in headers):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as sf:
                for k in sf.keys():
                    t = sf.get_tensor(k)
                    state[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"weight shard {f} is unreadable: {str(e).splitlines()[0]}") from None
    fuse_checkpoint_state_(model, state)  # [q; k; v] and [gate; up] become one tensor each, one at a time
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()
    return LoadedCheckpoint(config=config, model=model, path=path)


# ------------------------------------------------------------------------------------ random checkpoints


def _stats(q01: list[float], q99: list[float], n_transitions: int, n_trajectories: int) -> dict[str, Any]:
    """norm_stats entry in the official layout; mean/std/min/max derived from the quantiles."""
    mean = [(a + b) / 2 for a, b in zip(q01, q99)]
    std = [(b - a) / 4 for a, b in zip(q01, q99)]
    lo = [a - 0.1 * (b - a) if i < 6 else 0.0 for i, (a, b) in enumerate(zip(q01, q99))]
    hi = [b + 0.1 * (b - a) if i < 6 else 1.0 for i, (a, b) in enumerate(zip(q01, q99))]
    zeros = [0.0] * 7
    return {
        "action": {"mean": mean, "std": std, "max": hi, "min": lo, "q01": q01, "q99": q99,
                   "mask": [True] * 6 + [False]},
        "proprio": {"mean": zeros, "std": zeros, "max": zeros, "min": zeros, "q01": zeros, "q99": zeros},
        "num_transitions": n_transitions,
        "num_trajectories": n_trajectories,
    }


def synthetic_norm_stats() -> dict[str, Any]:
    """Made-up statistics with realistic scales (NOT the published ones): LIBERO's OSC deltas reach about
    +-0.94 per translation axis; Bridge (WidowX) moves about +-3 cm and +-0.1 rad per step. Gripper 0..1."""
    def libero(scale: float) -> list[list[float]]:
        q01 = [-0.75 * scale, -0.86 * scale, -0.94 * scale, -0.11, -0.17, -0.19, 0.0]
        q99 = [0.94 * scale, 0.87 * scale, 0.94 * scale, 0.13, 0.18, 0.29, 1.0]
        return [q01, q99]

    stats = {
        "libero_object": _stats(*libero(1.0), 66984, 454),
        "libero_spatial": _stats(*libero(0.98), 52970, 432),
        "libero_goal": _stats(*libero(0.96), 52042, 428),
        "libero_10": _stats(*libero(1.0), 101469, 379),
        "bridge_orig": _stats([-0.029, -0.042, -0.026, -0.081, -0.092, -0.16, 0.0],
                              [0.028, 0.041, 0.040, 0.082, 0.078, 0.16, 1.0], 2135463, 60064),
    }
    return stats


TINY_VITS = [
    dict(width=32, depth=3, heads=2, mlp_dim=128, class_token=True, reg_tokens=4, no_embed_class=True,
         layerscale=True),
    dict(width=48, depth=3, heads=2, mlp_dim=96, class_token=False, attn_pool=True),
]
TEXT_CONFIGS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
}


def make_config(size: str, seed: int = 0) -> dict[str, Any]:
    """config.json of a random checkpoint: the official OpenVLA fields plus `rtloop_generated`."""
    if size not in SIZES:
        raise CheckpointError(f"unknown checkpoint size {size!r}; choose one of {', '.join(SIZES)}")
    dtype = "bfloat16" if size == "7b" else "float32"
    text_config = {
        "model_type": "llama", "vocab_size": 32064, "pad_token_id": 32000, "torch_dtype": dtype,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, **TEXT_CONFIGS[size],
    }
    config = {
        "architectures": ["OpenVLAForActionPrediction"],
        "model_type": "openvla",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_sizes": [224, 224],
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "image_resize_strategy": "resize-naive",
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "llm_max_length": 2048,
        "pad_token_id": 32000,
        "pad_to_multiple_of": 64,
        "output_projector_states": False,
        "n_action_bins": 256,
        "norm_stats": synthetic_norm_stats(),
        "text_config": text_config,
        "torch_dtype": dtype,
        # action_bias: the generator's knob (CHANNEL0_BIAS); a cached checkpoint made with another is stale
        "rtloop_generated": {"size": size, "seed": seed, "random_weights": True, "action_bias": CHANNEL0_BIAS[size]},
    }
    if size == "tiny":
        config["rtloop_vit_args"] = TINY_VITS
    return config


def _init_kind(name: str, ndim: int) -> str:
    if name.endswith("scale_factor"):
        return "layerscale"
    if name.endswith(".bias"):
        return "zeros"
    if ndim == 1 and "norm" in name:  # LayerNorm / RMSNorm weights
        return "ones"
    return "normal"


def init_tensor_(name: str, t: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Random weights that keep bf16 activations finite: small normal matrices, unit norms, zero biases."""
    kind = _init_kind(name, t.ndim)
    if kind == "zeros":
        t.zero_()
    elif kind == "ones":
        t.fill_(1.0)
    elif kind == "layerscale":
        t.fill_(0.1)
    else:
        t.normal_(0.0, std, generator=generator)


INIT_STD = {"tiny": 0.1, "7b": 0.02}


# 7b: the 32 random layers add noise of RMS ~13 to every residual channel (measured on 4 layers of the real
# shape: RMS 2.4, 3.5, 4.3, 5.1 after each), which buries a +1 on channel 0; at 128 the action logits stand
# ~9 above the others (whose spread is ~1.3). Tiny, seed 0, centre-cropped frames: at 1.0, 5 of the 60
# recorded LIBERO frames (MuJoCo 3.3.2's brighter render) gave a non-action token; at 2.0 none did, and
# they gave 25 distinct token sequences (20 smooth random images: all action tokens, 17 distinct); at 3.0
# only 4 distinct: the bias starts to drown the image.
CHANNEL0_BIAS = {"tiny": 2.0, "7b": 128.0}


@torch.no_grad()
def _favour_action_tokens_(name: str, tensor: torch.Tensor, config: OpenVLAConfig) -> None:
    """Random checkpoints only (both sizes; latency does not depend on weight values): every token embedding
    gets CHANNEL0_BIAS on channel 0, which the residual stream carries to the last position; lm_head reads
    channel 0 only for the 256 action ids (31744..31999), lifting their logits by several units (numbers
    at CHANNEL0_BIAS). So a random model usually emits action tokens, and which one still depends on the
    image and prompt."""
    last = config.llm.vocab_size - config.pad_to_multiple_of  # 32000
    if name == "language_model.model.embed_tokens.weight":
        tensor[:, 0] = CHANNEL0_BIAS[(config.generated or {}).get("size", "tiny")]
    elif name == "language_model.lm_head.weight":
        tensor[:, 0] = 0.0
        tensor[last - config.n_action_bins : last, 0] = 1.0


def build_meta_model(size: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> OpenVLA:
    """The model of a random checkpoint on the `meta` device: shapes and names, no memory."""
    config = OpenVLAConfig.from_dict(make_config(size, seed))
    with torch.device("meta"):
        model = OpenVLA(config)
    return model.to(dtype)


@torch.no_grad()
def build_random_model(size: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0) -> OpenVLA:
    """A random-weight OpenVLA built directly on `device` (for 7b: GPU memory, no disk, no CPU copy)."""
    model = build_meta_model(size, dtype, seed).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    # under the checkpoint's names (views of the fused matrices): the same values a checkpoint file gets
    for name, t in model.state_dict().items():
        init_tensor_(name, t, INIT_STD[size], generator)
        _favour_action_tokens_(name, t, model.config)
    model.requires_grad_(False)
    return model.eval()


def plan_shards(shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> list[list[str]]:
    """Split tensor names, in order, into groups of at most SHARD_BYTES each."""
    shards, current, current_bytes = [], [], 0
    for name, (shape, dtype) in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if current and current_bytes + nbytes > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    return shards + [current]


def make_checkpoint(size: str, out: str | Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint directory. tiny: one fp32 model.safetensors; 7b: bf16 shards of at
    most 2 GB plus the index, generated one shard at a time (one shard in memory, never the whole model)."""
    from safetensors.torch import save_file

    from rtloop.policy.tokenizer import write_tokenizer_files

    config = make_config(size, seed)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if size == "tiny":
        model = build_random_model("tiny", "cpu", torch.float32, seed)
        # clones: the parts of a fused matrix are views of one tensor, which safetensors will not store
        save_file({k: v.clone() for k, v in model.state_dict().items()}, out / "model.safetensors", metadata)
    else:
        meta = build_meta_model(size, torch.bfloat16, seed)
        shapes = {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()}
        shards = plan_shards(shapes)
        generator = torch.Generator().manual_seed(seed)
        weight_map, total = {}, 0
        for i, names in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                shape, dtype = shapes[name]
                t = torch.empty(shape, dtype=dtype)
                init_tensor_(name, t, INIT_STD[size], generator)
                _favour_action_tokens_(name, t, meta.config)
                tensors[name] = t
                weight_map[name] = filename
                total += t.numel() * t.element_size()
            save_file(tensors, out / filename, metadata)
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer_files(out)
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
