import math

import numpy as np
import pytest
import torch
from PIL import Image

from rtloop.errors import InputError
from rtloop.policy.processor import (
    as_array,
    build_prompt,
    center_crop_resize,
    check_prompt_template,
    jpeg_round_trip,
    pixel_values,
    prepare_libero_image,
    tokenize_prompt,
)
from rtloop.policy.tokenizer import load_tokenizer, write_tokenizer_files


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out)
    return load_tokenizer(out)


def test_prompt_template_verbatim():
    assert build_prompt("Pick up the BOWL") == "In: What action should the robot take to pick up the bowl?\nOut:"


@pytest.mark.parametrize("template", ["{}", "Task: {task}", "no field", "{instruction} {instruction}", "{instruction"])
def test_bad_custom_template(template):
    with pytest.raises(InputError, match="prompt template"):
        check_prompt_template(template)


def test_empty_instruction():
    with pytest.raises(InputError, match="non-empty string"):
        build_prompt("  ")


def test_tokenize_appends_space_token_once(tokenizer):
    ids = tokenize_prompt(tokenizer, build_prompt("pick up the bowl"))
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert ids[0, 0].item() == 1 and ids[0, -1].item() == 29871 and ids[0, -2].item() != 29871
    assert ids[0, :-1].tolist() == tokenizer.encode(build_prompt("pick up the bowl"))
    ending_in_space = tokenize_prompt(tokenizer, "Out: ")  # already ends in "▁": nothing appended
    assert ending_in_space[0].tolist() == tokenizer.encode("Out: ")


def quadrants() -> np.ndarray:
    """256x256: red top-left, green top-right, blue bottom-left, white bottom-right."""
    img = np.zeros((256, 256, 3), np.uint8)
    img[:128, :128] = (255, 0, 0)
    img[:128, 128:] = (0, 255, 0)
    img[128:, :128] = (0, 0, 255)
    img[128:, 128:] = (255, 255, 255)
    return img


def test_libero_image_is_rotated_180_degrees():
    out = prepare_libero_image(quadrants())
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    corners = {"top-left": out[40, 40], "top-right": out[40, 184], "bottom-left": out[184, 40], "bottom-right": out[184, 184]}
    # a 180° rotation swaps diagonally; a vertical flip alone would put blue top-left
    expected = {"top-left": (255, 255, 255), "top-right": (0, 0, 255), "bottom-left": (0, 255, 0), "bottom-right": (255, 0, 0)}
    for name, colour in expected.items():
        np.testing.assert_allclose(corners[name], colour, atol=12, err_msg=name)


def test_libero_image_goes_through_jpeg():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    without_jpeg = np.asarray(Image.fromarray(np.ascontiguousarray(frame[::-1, ::-1])).resize((224, 224), Image.LANCZOS))
    assert not np.array_equal(prepare_libero_image(frame), without_jpeg)
    smooth = np.asarray(Image.fromarray(frame).resize((32, 32)).resize((256, 256), Image.BILINEAR))
    round_trip = jpeg_round_trip(smooth)
    assert round_trip.shape == smooth.shape and 0 < np.abs(round_trip.astype(int) - smooth).mean() < 3


def test_no_rotation_switch():
    frame = quadrants()
    np.testing.assert_allclose(prepare_libero_image(frame, rotate=False)[40, 40], (255, 0, 0), atol=12)


def test_center_crop_keeps_90_percent_of_area():
    gradient = np.tile(np.arange(224, dtype=np.uint8)[None, :, None], (224, 1, 3))  # pixel value = column
    out = center_crop_resize(gradient, 0.9)
    side = math.sqrt(0.9)
    assert out.shape == gradient.shape
    # tf.image.crop_and_resize samples columns lo*(w-1) .. hi*(w-1) evenly
    assert abs(int(out[100, 0, 0]) - (1 - side) / 2 * 223) <= 1
    assert abs(int(out[100, -1, 0]) - (1 + side) / 2 * 223) <= 1
    assert np.all(np.diff(out[100, :, 0].astype(int)) >= 0)
    cropped = prepare_libero_image(quadrants(), center_crop=True)
    uncropped = prepare_libero_image(quadrants(), center_crop=False)
    assert cropped.shape == (224, 224, 3) and not np.array_equal(cropped, uncropped)
    # on by default, as the official LIBERO eval (center_crop=True)
    assert np.array_equal(prepare_libero_image(quadrants()), cropped)


def test_pil_images_are_taken_as_rgb_arrays():
    rgb = quadrants()
    assert np.array_equal(as_array(Image.fromarray(rgb)), rgb)
    rgba = as_array(Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])))
    assert rgba.shape == rgb.shape and np.array_equal(rgba, rgb)
    grey = as_array(Image.fromarray(rgb[..., 0]))
    assert grey.shape == rgb.shape and np.array_equal(grey[..., 0], rgb[..., 0])
    assert as_array(rgb) is rgb


def test_pixel_values_normalisation():
    image = np.full((224, 224, 3), 128, np.uint8)
    image[..., 2] = 255
    px = pixel_values(image, "cpu", torch.float32)
    assert px.shape == (1, 6, 224, 224) and px.dtype == torch.float32
    v = 128 / 255
    expected = [(v - 0.485) / 0.229, (v - 0.456) / 0.224, (1 - 0.406) / 0.225, (v - 0.5) / 0.5, (v - 0.5) / 0.5, 1.0]
    np.testing.assert_allclose(px[0, :, 17, 99].numpy(), expected, atol=1e-6)
    assert pixel_values(image, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_pixel_values_resizes_other_sizes():
    image = np.zeros((256, 300, 3), np.uint8)
    image[:, 150:] = 200
    px = pixel_values(image, "cpu", torch.float32)
    assert px.shape == (1, 6, 224, 224)
    assert px[0, 3, 5, 5].item() == pytest.approx(-1.0) and px[0, 3, 5, 220].item() == pytest.approx(200 / 255 * 2 - 1)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((224, 224), np.uint8), "HxWx3"),
        (np.zeros((224, 224, 4), np.uint8), "HxWx3"),
        (np.zeros((224, 224, 3), np.float32), "must be uint8, got float32"),
        ([[0]], "numpy array"),
    ],
)
def test_bad_images_are_one_line_input_errors(image, match):
    for fn in (lambda: pixel_values(image, "cpu", torch.float32), lambda: prepare_libero_image(image)):
        with pytest.raises(InputError, match=match) as e:
            fn()
        assert "\n" not in str(e.value)
