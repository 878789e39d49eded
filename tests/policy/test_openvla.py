import json
import os
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from rtloop.errors import ActionError, InputError, UnnormKeyError
from rtloop.policy.base import LIBERO_IMAGE, STAGES, PolicyOutput
from rtloop.policy.openvla import OpenVLAPolicy
from rtloop.policy.processor import prepare_libero_image

INSTRUCTION = "pick up the alphabet soup and place it in the basket"


def frame(seed: int) -> np.ndarray:
    """A smooth random 256x256 frame, standing in for a camera image."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((256, 256), Image.BICUBIC))


@pytest.fixture(scope="module")
def policy(tiny_checkpoint):
    return OpenVLAPolicy(tiny_checkpoint)


def alert_kinds(policy) -> list[str]:
    """Alerts still queued: raised at construction or by predict_action (act hands them back itself)."""
    return [a.kind for a in policy.guards.drain()]


def kinds(out: PolicyOutput) -> list[str]:
    return [a.kind for a in out.alerts]


def test_predict_action_returns_action_and_stage_times(policy):
    action, timings = policy.predict_action(prepare_libero_image(frame(0)), INSTRUCTION)
    assert action.shape == (7,) and np.all(np.isfinite(action))
    assert set(timings) == set(STAGES) and all(t > 0 for t in timings.values())
    again, _ = policy.predict_action(prepare_libero_image(frame(0)), INSTRUCTION)
    assert np.array_equal(action, again)  # greedy decoding is deterministic


def test_act_maps_gripper_for_libero(policy):
    out = policy.act(frame(1), INSTRUCTION)
    assert isinstance(out, PolicyOutput)
    assert np.array_equal(out.action[:6], out.raw_action[:6])
    assert out.action[-1] == -np.sign(2 * out.raw_action[-1] - 1)
    assert set(out.timings) == {*STAGES, LIBERO_IMAGE} and all(t > 0 for t in out.timings.values())


def test_label_and_default_key(policy, tiny_checkpoint):
    assert "RANDOM WEIGHTS" in policy.label and tiny_checkpoint.name in policy.label
    assert policy.unnorm_key == "libero_object"


def test_unknown_key_names_the_finetuned_checkpoints(tiny_checkpoint):
    with pytest.raises(UnnormKeyError, match="this checkpoint has: bridge_orig, libero_10") as e:
        OpenVLAPolicy(tiny_checkpoint, unnorm_key="libero_90")
    assert "openvla-7b-finetuned-libero-" in str(e.value) and "\n" not in str(e.value)


def test_no_key_outside_libero_with_several_datasets(tiny_checkpoint):
    with pytest.raises(UnnormKeyError, match="choose one"):
        OpenVLAPolicy(tiny_checkpoint, suite=None)


def test_bridge_statistics_in_libero_are_flagged(tiny_checkpoint):
    p = OpenVLAPolicy(tiny_checkpoint, unnorm_key="bridge_orig")
    assert alert_kinds(p) == ["unnorm_key"]
    action, _ = p.predict_action(prepare_libero_image(frame(0)), INSTRUCTION)
    assert np.all(np.abs(action[:3]) < 0.05)  # Bridge scales: centimetres, the LIBERO arm would barely move


def test_per_call_unnorm_key(policy):
    image = prepare_libero_image(frame(0))
    ours, _ = policy.predict_action(image, INSTRUCTION)
    spatial, _ = policy.predict_action(image, INSTRUCTION, unnorm_key="libero_spatial")
    assert not np.array_equal(ours[:6], spatial[:6]) and "unnorm_key" in alert_kinds(policy)
    with pytest.raises(UnnormKeyError):
        policy.predict_action(image, INSTRUCTION, unnorm_key="nope")


def test_black_frame_still_acts_but_warns(tiny_checkpoint):
    p = OpenVLAPolicy(tiny_checkpoint)
    assert kinds(p.act(frame(0), INSTRUCTION)) == []
    out = p.act(np.zeros((256, 256, 3), np.uint8), INSTRUCTION)
    assert np.all(np.isfinite(out.action)) and kinds(out) == ["blank_frame"] and alert_kinds(p) == []


def test_custom_prompt_template_and_no_rotation_warn(tiny_checkpoint):
    p = OpenVLAPolicy(tiny_checkpoint, prompt_template="Robot, {instruction}!", rotate=False)
    assert sorted(kinds(p.act(frame(0), INSTRUCTION))) == ["image_orientation", "prompt"]
    with pytest.raises(InputError, match="prompt template"):
        OpenVLAPolicy(tiny_checkpoint, prompt_template="Robot, {task}!")


def test_bad_image_and_instruction(policy):
    with pytest.raises(InputError, match="uint8"):
        policy.predict_action(np.zeros((224, 224, 3), np.float32), INSTRUCTION)
    with pytest.raises(InputError, match="HxWx3"):
        policy.act(np.zeros((256, 256), np.uint8), INSTRUCTION)
    with pytest.raises(InputError, match="instruction"):
        policy.act(frame(0), "")


def test_non_finite_statistics_raise(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    stats = json.loads((ckpt / "config.json").read_text())["norm_stats"]
    stats["libero_object"]["action"]["q99"][0] = float("inf")
    (ckpt / "dataset_statistics.json").write_text(json.dumps(stats))  # replaces norm_stats, as officially
    p = OpenVLAPolicy(ckpt)
    with pytest.raises(ActionError, match="non-finite action"):
        p.act(frame(0), INSTRUCTION)


def test_model_built_in_memory(tmp_path):
    """The bench path for 7B random weights: a model that never touched disk, a directory with the tokenizer."""
    import torch

    from rtloop.policy.checkpoint import build_random_model
    from rtloop.policy.tokenizer import write_tokenizer_files

    write_tokenizer_files(tmp_path)
    p = OpenVLAPolicy(tmp_path, model=build_random_model("tiny", "cpu", torch.float32, seed=0))
    action, _ = p.predict_action(prepare_libero_image(frame(0)), INSTRUCTION)
    assert np.all(np.isfinite(action)) and "RANDOM WEIGHTS" in p.label


@pytest.mark.slow
def test_real_libero_frames(policy):
    """libero_object task 0 after the 10 settle steps: real frames go through, and no detector fires except
    possibly constant_action (random weights may ignore small image changes)."""
    from libero.libero import benchmark, get_libero_path
    from libero.libero.envs import OffScreenRenderEnv

    suite = benchmark.get_benchmark_dict()["libero_object"]()
    task = suite.get_task(0)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=256, camera_widths=256)
    try:
        env.seed(0)
        env.reset()
        obs = env.set_init_state(suite.get_task_init_states(0)[0])
        for _ in range(10):
            obs, *_ = env.step([0, 0, 0, 0, 0, 0, -1])
        policy.guards.drain()
        seen = []
        for _ in range(3):
            out = policy.act(obs["agentview_image"], task.language)
            seen += kinds(out)
            assert np.all(np.isfinite(out.action)) and out.action[-1] in (-1.0, 1.0)
            obs, *_ = env.step(out.action)
    finally:
        env.close()
    assert set(seen) <= {"constant_action"}


def test_act_batch_gives_each_frame_its_own_action(tiny_checkpoint):
    """One batched call, frames with their own prompts: each output is what act() gives that frame alone
    (fp32 on the CPU); the guards keep one history per stream."""
    batched = OpenVLAPolicy(tiny_checkpoint, max_batch=4)
    instructions = [INSTRUCTION, "open the top drawer and put the bowl inside", "pick it up"]
    frames = [frame(10 + i) for i in range(3)]
    outs = batched.act_batch(frames, instructions)
    assert len(outs) == 3 and all(isinstance(o, PolicyOutput) for o in outs)
    for out, f, instruction in zip(outs, frames, instructions):
        alone = batched.act(f, instruction)
        assert np.array_equal(out.action, alone.action) and np.array_equal(out.raw_action, alone.raw_action)
        assert set(out.timings) == {*STAGES, LIBERO_IMAGE}
        assert 0 < out.timings[LIBERO_IMAGE] < out.timings["processor"]
    assert len({tuple(o.raw_action) for o in outs}) > 1
    assert set(batched._stream_guards) == {0, 1, 2}
    actions, _ = batched.predict_action_batch([prepare_libero_image(f) for f in frames[:2]], instructions[:2],
                                              streams=[7, 7])
    assert actions.shape == (2, 7) and 7 in batched._stream_guards
    for stream in (7, 0):  # a finished stream's history goes; stream 0 (the configuration's) stays
        batched.end_stream(stream)
    assert set(batched._stream_guards) == {0, 1, 2}


def image_threads_alive() -> int:
    return sum(t.name.startswith("rtloop-image") for t in threading.enumerate())


def test_a_batch_of_frames_is_prepared_on_threads_as_in_series(tiny_checkpoint):
    """The image threads give each frame what prepare_libero_image gives it, in order, with its own rotation;
    close() ends them."""
    batched = OpenVLAPolicy(tiny_checkpoint, max_batch=4, image_threads=3)
    frames, rotate = [frame(20 + i) for i in range(4)], [True, False, True, False]
    timings: dict[str, float] = {}
    images = batched.prepare_frames(frames, timings, rotate=rotate)
    assert image_threads_alive() >= 1 and set(timings) == {"processor", LIBERO_IMAGE}
    for image, f, r in zip(images, frames, rotate):
        assert np.array_equal(image, prepare_libero_image(f, rotate=r))
    batched.set_image_threads(1)
    assert image_threads_alive() == 0
    assert all(np.array_equal(a, b) for a, b in zip(batched.prepare_frames(frames, {}, rotate=rotate), images))
    with pytest.raises(InputError, match="image threads must be >= 1"):
        batched.set_image_threads(0)
    batched.set_image_threads(None)  # one per frame of the largest batch, up to the cores
    assert batched.image_threads == min(4, os.cpu_count())
    batched.prepare_frames(frames, {})
    batched.close()
    assert image_threads_alive() == 0


def test_act_batch_bad_input_is_one_line(policy):
    image = prepare_libero_image(frame(0))
    with pytest.raises(InputError, match="2 images for 1 instructions"):
        policy.predict_action_batch([image, image], [INSTRUCTION])
    with pytest.raises(InputError, match="a batch of 2 frames; this policy takes 1 to 1"):
        policy.predict_action_batch([image, image], [INSTRUCTION] * 2)


def test_centre_crop_is_on_by_default_as_in_the_official_eval(policy):
    assert policy.center_crop
    raw = frame(2)
    out = policy.act(raw, INSTRUCTION)
    cropped, _ = policy.predict_action(prepare_libero_image(raw, center_crop=True), INSTRUCTION)
    assert np.array_equal(out.raw_action, cropped)


def test_predict_action_takes_a_pil_image_as_the_chapter_passes_one(policy):
    image = prepare_libero_image(frame(3))
    from_array, _ = policy.predict_action(image, INSTRUCTION)
    from_pil, _ = policy.predict_action(Image.fromarray(image), INSTRUCTION)
    assert np.array_equal(from_array, from_pil)
    # the chapter's own input: the 256x256 frame, flipped, as a PIL image (resized naively to 224 here)
    chapter, _ = policy.predict_action(Image.fromarray(frame(3)[::-1]), INSTRUCTION)
    assert chapter.shape == (7,) and np.all(np.isfinite(chapter))
    assert np.array_equal(policy.act(Image.fromarray(frame(3)), INSTRUCTION).action,
                          policy.act(frame(3), INSTRUCTION).action)


def test_nan_weights_are_reported_as_non_finite_logits(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(ckpt / "model.safetensors")
    state["language_model.model.norm.weight"][:] = float("nan")
    save_file(state, ckpt / "model.safetensors", {"format": "pt"})
    p = OpenVLAPolicy(ckpt)
    with pytest.raises(ActionError) as e:
        p.act(frame(0), INSTRUCTION)
    assert str(e.value).startswith("the model's logits are not finite (NaN or inf)")
    assert "not an action token" not in str(e.value) and "\n" not in str(e.value)


def test_statistics_of_the_wrong_dimension_are_named_before_the_weights_load(tiny_checkpoint, tmp_path):
    from rtloop.errors import CheckpointError

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    stats = json.loads((ckpt / "config.json").read_text())["norm_stats"]
    stats["libero_object"]["action"]["q99"] = stats["libero_object"]["action"]["q99"] + [1.0]
    (ckpt / "dataset_statistics.json").write_text(json.dumps(stats))
    # tensor data safetensors would refuse to read (an unknown dtype): the statistics fail first
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    f.write_bytes(data[: 8 + n].replace(b'"dtype":"F32"', b'"dtype":"Q32"', 1) + data[8 + n :])
    with pytest.raises(CheckpointError) as e:
        OpenVLAPolicy(ckpt)
    message = str(e.value)
    assert "dataset_statistics.json, key 'libero_object': the action statistics have the wrong dimension" in message
    assert "q99 has 8 entries; OpenVLA's actions have 7" in message


def test_no_key_for_the_suite_gives_the_finetuned_hint(tiny_checkpoint, tmp_path):
    """The base openvla-7b run on LIBERO with no --unnorm-key: it has no LIBERO statistics at all."""
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    stats = json.loads((ckpt / "config.json").read_text())["norm_stats"]
    (ckpt / "dataset_statistics.json").write_text(json.dumps({"bridge_orig": stats["bridge_orig"]}))
    with pytest.raises(UnnormKeyError) as e:
        OpenVLAPolicy(ckpt, suite="libero_object")
    message = str(e.value)
    assert message.startswith("this checkpoint has no statistics for libero_object (libero_object or "
                              "libero_object_no_noops); it has: bridge_orig.")
    assert "openvla-7b-finetuned-libero-" in message and "--unnorm-key" in message and "\n" not in message
    assert OpenVLAPolicy(ckpt, suite="libero_object", unnorm_key="bridge_orig").unnorm_key == "bridge_orig"
