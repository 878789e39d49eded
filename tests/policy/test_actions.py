import numpy as np
import pytest

from rtloop.errors import ActionError, UnnormKeyError
from rtloop.policy.actions import ActionDetokenizer, default_unnorm_key, libero_gripper, resolve_unnorm_key

Q01 = [-2.0, -1.0, 0.0, -0.5, -0.5, -0.5, 0.0]
Q99 = [2.0, 1.0, 1.0, 0.5, 0.5, 0.5, 1.0]
MASK = [True] * 6 + [False]


def detokenizer(q01=Q01, q99=Q99):
    stats = {"action": {"q01": q01, "q99": q99, "mask": MASK}}
    return ActionDetokenizer(text_vocab_size=32064, pad_to_multiple_of=64, n_action_bins=256, stats=stats)


def test_bin_edges_by_hand():
    d = detokenizer()
    assert d.token_range == (31744, 31999)
    # 31999: idx 0, the lowest centre -1 + 1/255. Dim 0 maps [-1, 1] onto [q01, q99] = [-2, 2].
    low = d(np.full(7, 31999))
    assert low[0] == pytest.approx(0.5 * (1 / 255) * 4 - 2)  # -1.99216
    assert low[2] == pytest.approx(0.5 * (1 / 255) * 1 + 0)  # 0.00196
    assert low[6] == pytest.approx(-1 + 1 / 255)  # gripper: mask false, stays normalised
    # 31744: idx 255 is clipped to 254, the highest of the 255 centres, 1 - 1/255
    high = d(np.full(7, 31744))
    assert high[0] == pytest.approx(2 - 2 / 255)
    assert high[6] == pytest.approx(1 - 1 / 255)
    assert np.array_equal(d(np.full(7, 31745)), high)  # the official clip makes the two top tokens equal
    # 31872: idx 127, centre (bins[127] + bins[128]) / 2 = 0 -> the middle of [q01, q99]
    mid = d(np.full(7, 31872))
    np.testing.assert_allclose(mid[:6], [(a + b) / 2 for a, b in zip(Q01[:6], Q99[:6])], atol=1e-12)
    assert mid[6] == pytest.approx(0.0, abs=1e-12)


def test_mixed_tokens_follow_formula():
    d = detokenizer()
    tokens = np.array([31999, 31744, 31872, 31800, 31900, 31950, 31760])
    centers = (np.linspace(-1, 1, 256)[:-1] + np.linspace(-1, 1, 256)[1:]) / 2
    norm = centers[np.clip(32000 - tokens - 1, 0, 254)]
    expected = np.where(MASK, 0.5 * (norm + 1) * (np.array(Q99) - Q01) + Q01, norm)
    np.testing.assert_allclose(d(tokens), expected)


@pytest.mark.parametrize("bad", [31743, 32000, 0, 29871])
def test_non_action_token_is_one_line_error(bad):
    tokens = np.full(7, 31900)
    tokens[3] = bad
    with pytest.raises(ActionError, match=f"token {bad}, which is not an action token") as e:
        detokenizer()(tokens)
    assert "\n" not in str(e.value)


def test_wrong_token_count():
    with pytest.raises(ActionError, match="expected 7 action tokens, got 6"):
        detokenizer()(np.full(6, 31900))


def test_non_finite_action():
    q99 = list(Q99)
    q99[1] = float("nan")
    with pytest.raises(ActionError, match="non-finite action") as e:
        detokenizer(q99=q99)(np.full(7, 31900))
    assert "\n" not in str(e.value)


STATS = {k: {} for k in ("bridge_orig", "fractal20220817_data", "libero_object_no_noops")}


def test_unknown_key_lists_keys_and_finetuned_hint():
    with pytest.raises(UnnormKeyError) as e:
        resolve_unnorm_key({"bridge_orig": {}, "fractal20220817_data": {}}, "libero_object")
    msg = str(e.value)
    assert "bridge_orig, fractal20220817_data" in msg
    assert "openvla-7b-finetuned-libero-" in msg and "\n" not in msg


def test_unknown_non_libero_key_has_no_libero_hint():
    with pytest.raises(UnnormKeyError, match="unknown unnorm_key 'kuka'") as e:
        resolve_unnorm_key(STATS, "kuka")
    assert "fine-tuned" not in str(e.value)


def test_no_key_with_several_datasets_lists_them():
    with pytest.raises(UnnormKeyError, match="3 datasets.*bridge_orig, fractal20220817_data, libero_object_no_noops"):
        resolve_unnorm_key(STATS, None)


def test_no_key_with_one_dataset_and_empty_stats():
    assert resolve_unnorm_key({"libero_goal": {}}, None) == "libero_goal"
    with pytest.raises(UnnormKeyError, match="no normalisation statistics"):
        resolve_unnorm_key({}, None)


def test_default_key_for_suite_accepts_no_noops():
    assert default_unnorm_key(STATS, "libero_object") == "libero_object_no_noops"
    assert default_unnorm_key({"libero_object": {}, "libero_object_no_noops": {}}, "libero_object") == "libero_object"
    assert default_unnorm_key(STATS, "libero_goal") is None


def test_libero_gripper_mapping():
    raw = np.array([0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.9])
    out = libero_gripper(raw)
    assert out[-1] == -1.0  # model says open (g > 0.5) -> LIBERO -1 = open
    assert raw[-1] == 0.9 and np.array_equal(out[:6], raw[:6])  # input untouched
    raw[-1] = 0.1
    assert libero_gripper(raw)[-1] == 1.0  # close
