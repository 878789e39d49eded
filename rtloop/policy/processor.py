"""OpenVLA's inputs: the prompt, its token ids, and the pixels for the two vision backbones.

Two image steps, kept apart because they belong to different owners:
- `prepare_libero_image`: what the official LIBERO eval does to a camera frame before the model sees it
  (180° rotation, JPEG round trip, Lanczos resize to 224, 90%-area centre crop unless turned off). It makes the sim
  frame look like the training data; other robots would do something else here.
- `pixel_values`: what the model's own processor does (`image_resize_strategy` "resize-naive" to 224, the
  only strategy OpenVLA's checkpoints use and the only one rtloop implements; per-backbone normalisation),
  in torch on the model's device.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rtloop.errors import InputError

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
SPACE_TOKEN = 29871  # SentencePiece "▁"
IMAGE_SIZE = 224
JPEG_QUALITY = 95  # tf.image.encode_jpeg's default, used by the RLDS dataset builder and the eval
CROP_AREA = 0.9
DINOV2_MEAN, DINOV2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def check_prompt_template(template: str) -> str:
    """A custom template must contain exactly one `{instruction}` field and nothing else to fill."""
    try:
        template.format(instruction="x")
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(
            f"prompt template {template!r} is not a format string with only {{instruction}}: {e}"
        ) from None
    if template.count("{instruction}") != 1:
        raise InputError(f"prompt template {template!r} must contain {{instruction}} exactly once")
    return template


def build_prompt(instruction: str, template: str = PROMPT_TEMPLATE) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError(f"the instruction must be a non-empty string, got {instruction!r}")
    return template.format(instruction=instruction.lower())


def tokenize_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """LongTensor [1, T]: BOS + the prompt, then "▁" (29871) unless it is already last, as the official
    `predict_action` does (the model was trained with it before the action tokens)."""
    ids = tokenizer.encode(prompt)
    if ids[-1] != SPACE_TOKEN:
        ids.append(SPACE_TOKEN)
    return torch.tensor([ids], dtype=torch.long)


def as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """A PIL image (the chapter passes one, as the official processor takes it) -> HxWx3 uint8 RGB, converted
    as that processor does (`convert("RGB")`); anything else is returned as it is, for check_image to judge."""
    return np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image


def check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise InputError(f"{what} must be a numpy array or a PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InputError(f"{what} must be HxWx3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise InputError(f"{what} must be uint8, got {image.dtype}")
    return image


def prepare_libero_image(frame: np.ndarray, center_crop: bool = True, rotate: bool = True) -> np.ndarray:
    """A LIBERO agentview frame (HxWx3 uint8, 256x256 in the official eval) -> the 224x224x3 uint8 image
    the fine-tuned OpenVLA expects. The centre crop is on by default, as in the official eval
    (`center_crop=True`: its LIBERO checkpoints were fine-tuned with random-crop augmentation); off only for
    models trained without it. `rotate=False` exists only to study the upside-down failure."""
    check_image(frame, "frame")
    img = frame[::-1, ::-1] if rotate else frame  # MuJoCo renders upside down and mirrored
    img = jpeg_round_trip(np.ascontiguousarray(img))
    img = np.asarray(Image.fromarray(img).resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS))
    if center_crop:
        img = center_crop_resize(img, CROP_AREA)
    return img


def jpeg_round_trip(img: np.ndarray) -> np.ndarray:
    """Encode and decode as JPEG, as the RLDS training data was stored (PIL/libjpeg, 4:2:0, quality 95;
    close to TensorFlow's encoder, not bit-identical)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def center_crop_resize(img: np.ndarray, area: float) -> np.ndarray:
    """The official `crop_and_resize`: the central box of `area` (sqrt(area) per side) bilinearly resampled
    back to the input size with tf.image.crop_and_resize's sampling grid, then tf's float->uint8 conversion."""
    h, w = img.shape[:2]
    y0, y1, wy, x0, x1, wx = _crop_grid(h, w, area)
    # float32 as tf computes it; bilinear is separable: rows, then columns, each a lerp of two gathers (it is on
    # the critical path of every inference)
    f = img.astype(np.float32)
    rows = f[y0]
    rows += (f[y1] - rows) * wy
    out = rows[:, x0]
    out += (rows[:, x1] - out) * wx
    # tf.image.convert_image_dtype(..., uint8, saturate): x / 255 clipped to [0, 1], times 255.5, floored
    np.clip(out * np.float32(255.5 / 255.0), 0.0, 255.0, out=out)
    return out.astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _crop_grid(h: int, w: int, area: float) -> tuple[np.ndarray, ...]:
    side = math.sqrt(area)
    lo, hi = (1 - side) / 2, (1 + side) / 2
    ys = np.linspace(lo * (h - 1), hi * (h - 1), h)
    xs = np.linspace(lo * (w - 1), hi * (w - 1), w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = (ys - y0).astype(np.float32)[:, None, None]
    wx = (xs - x0).astype(np.float32)[None, :, None]
    return y0, y1, wy, x0, x1, wx


def pixel_values(image: np.ndarray, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """HxWx3 uint8 -> [1, 6, 224, 224]: DINOv2-normalised RGB, then SigLIP-normalised RGB. The uint8 image
    crosses to the device (a quarter of the float bytes) from pinned memory, without blocking; on the device
    both normalisations are one broadcast multiply-add into the output dtype (a few ops cost ~0.1 ms each on
    the host, which is what this stage is made of). Graphed engines skip it: they take the uint8 image, and
    its copy and normalisation are the first nodes of their CUDA graph."""
    check_image(image)
    device = torch.device(device)
    pinned = device.type == "cuda"
    host = torch.empty(image.shape, dtype=torch.uint8, pin_memory=pinned)  # pinned blocks are cached and reused
    np.copyto(host.numpy(), image)  # a copy either way: frames may be read-only, and are the caller's
    x = host.to(device, non_blocking=pinned).permute(2, 0, 1)  # [3, H, W], 0..255
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        # resize-naive (aspect ignored), bicubic with antialias, re-quantised like the PIL image the
        # official processor resizes
        x = F.interpolate(x[None].float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", antialias=True,
                          align_corners=False)[0]
        x = x.round_().clamp_(0, 255)
    return normalise(x, dtype)


def normalise(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """RGB [3, H, W] or a batch [B, 3, H, W] with values 0..255 (any dtype) -> [B, 6, H, W] of `dtype`
    (B = 1 for one image): DINOv2's normalisation, then SigLIP's. One broadcast multiply-add on x's device.
    Graphed engines run it inside their CUDA graph."""
    scale, shift = _normalisation(x.device)
    x = x if x.dim() == 4 else x[None]
    B, _, H, W = x.shape
    out = torch.empty(B, 6, H, W, device=x.device, dtype=dtype) if out is None else out
    torch.addcmul(shift, x[:, None], scale, out=out.view(B, 2, 3, H, W))  # (x / 255 - mean) / std
    return out


_NORMALISATION: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), -mean / std) as [1, 2, 3, 1, 1] float32 on `device`: [DINOv2's, SigLIP's] x RGB.
    Made once per device: building them per call cost a host-to-device copy each."""
    if device not in _NORMALISATION:
        mean = torch.tensor([DINOV2_MEAN, SIGLIP_MEAN], dtype=torch.float64)
        std = torch.tensor([DINOV2_STD, SIGLIP_STD], dtype=torch.float64)
        _NORMALISATION[device] = tuple(
            t.float().view(1, 2, 3, 1, 1).to(device) for t in (1.0 / (255.0 * std), -mean / std)
        )
    return _NORMALISATION[device]
