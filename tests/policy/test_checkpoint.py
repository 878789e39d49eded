"""Checkpoint directories: make -> load round trip on real files, sharded loading, every missing-file error,
the strict key check, dataset_statistics.json, and the `rtloop checkpoint` CLI as a real process."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtloop.errors import CheckpointError
from rtloop.policy.checkpoint import (
    INDEX_FILE, REQUIRED_FILES, SHARD_BYTES, build_meta_model, plan_shards, build_random_model, load_checkpoint,
    make_checkpoint,
)
from rtloop.policy.config import OpenVLAConfig


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the session's tiny checkpoint, free to damage."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_tiny_round_trip(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", *REQUIRED_FILES} <= names
    loaded = load_checkpoint(tiny_checkpoint)
    want = build_random_model("tiny", "cpu", torch.float32, seed=0).state_dict()
    got = loaded.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.config.generated == {"size": "tiny", "seed": 0, "random_weights": True, "action_bias": 2.0}


def test_config_fields(tiny_checkpoint):
    c = OpenVLAConfig.from_dir(tiny_checkpoint)
    assert c.llm.vocab_size == 32064 and c.pad_to_multiple_of == 64 and c.n_action_bins == 256
    assert c.timm_model_ids == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert set(c.norm_stats) == {"libero_object", "libero_spatial", "libero_goal", "libero_10", "bridge_orig"}
    for stats in c.norm_stats.values():
        action = stats["action"]
        assert action["mask"] == [True] * 6 + [False]
        assert all(len(action[k]) == 7 for k in ("mean", "std", "max", "min", "q01", "q99"))
    assert max(c.norm_stats["libero_object"]["action"]["q99"][:3]) == pytest.approx(0.94)
    assert max(c.norm_stats["bridge_orig"]["action"]["q99"][:3]) < 0.05


def test_load_casts_dtype(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sharded_checkpoint_loads(sharded, tiny_checkpoint):
    ckpt, _ = sharded
    state = load_file(tiny_checkpoint / "model.safetensors")
    got = load_checkpoint(ckpt).model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)

    (ckpt / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in _error(ckpt)


def test_missing_directory(tmp_path):
    assert "does not exist" in _error(tmp_path / "nope")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.model"])
def test_missing_required_file(ckpt, name):
    (ckpt / name).unlink()
    assert name in _error(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    assert "*.safetensors" in _error(ckpt)


def test_strict_key_check(ckpt):
    state = load_file(ckpt / "model.safetensors")
    state["vision_backbone.featurizer.blocks.0.ls1.gamma"] = state.pop("vision_backbone.featurizer.blocks.0.ls1.scale_factor")
    save_file(state, ckpt / "model.safetensors")
    message = _error(ckpt)
    assert "1 missing" in message and "blocks.0.ls1.scale_factor" in message
    assert "1 unexpected" in message and "blocks.0.ls1.gamma" in message


def test_wrong_shape(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 128
    (ckpt / "config.json").write_text(json.dumps(config))
    assert "wrong shape" in _error(ckpt)


def test_dataset_statistics_replace_norm_stats(ckpt):
    stats = {"libero_object_no_noops": json.loads((ckpt / "config.json").read_text())["norm_stats"]["libero_object"]}
    (ckpt / "dataset_statistics.json").write_text(json.dumps(stats))
    assert list(load_checkpoint(ckpt).config.norm_stats) == ["libero_object_no_noops"]


def test_minimal_official_text_config_takes_llama_defaults():
    """The published config.json gives only a few text_config fields; the rest are LlamaConfig defaults."""
    from rtloop.policy.checkpoint import make_config

    d = make_config("7b")
    d["text_config"] = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16", "vocab_size": 32064}
    llm = OpenVLAConfig.from_dict(d).llm
    assert (llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads) == (4096, 32, 32, 32)
    assert (llm.intermediate_size, llm.rms_norm_eps, llm.rope_theta) == (11008, 1e-6, 10000.0)


def test_7b_shard_plan():
    shapes = {k: (v.shape, v.dtype) for k, v in build_meta_model("7b", torch.bfloat16, 0).state_dict().items()}
    shards = plan_shards(shapes)
    assert len(shards) == 8
    assert sum(len(s) for s in shards) == len(shapes) == 982
    for names in shards:
        assert sum(shapes[k][0].numel() * 2 for k in names) <= SHARD_BYTES


def _rtloop(*args):
    return subprocess.run([sys.executable, "-m", "rtloop", "checkpoint", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_make_and_inspect(tmp_path):
    out = tmp_path / "cli-tiny"
    made = _rtloop("make", "--size", "tiny", "--out", str(out), "--seed", "3")
    assert made.returncode == 0, made.stderr
    assert load_checkpoint(out).config.generated["seed"] == 3
    shown = _rtloop("inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "RANDOM WEIGHTS" in shown.stdout
    assert "bridge_orig, libero_10, libero_goal, libero_object, libero_spatial" in shown.stdout



def test_cli_error_is_one_line(ckpt, capsys):
    from rtloop.cli import main

    (ckpt / "tokenizer.model").unlink()
    assert main(["checkpoint", "inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "tokenizer.model is missing" in err


def test_make_refuses_a_non_empty_directory(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not an empty directory"):
        make_checkpoint("tiny", tiny_checkpoint)


# ---------------------------------------------------------------------------- damaged files, named


@pytest.fixture
def inspect_error(capsys):
    """`rtloop checkpoint inspect DIR` through the CLI's main, in process: exit 2 and one line, returned."""
    from rtloop.cli import main

    def run(path) -> str:
        assert main(["checkpoint", "inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("rtloop: error: "), err
        return err

    return run


def _rewrite_header(f, edit) -> None:
    """Edit a safetensors header in place, keeping its length (padded with spaces, as the format allows)."""
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    f.write_bytes(data[:8] + text.ljust(n) + data[8 + n :])


def test_truncated_shard_is_named_before_loading(ckpt, inspect_error):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    message = _error(ckpt)
    assert f"weight shard {f} is truncated" in message and f"the file has {len(data) - 100}" in message
    assert f"weight shard {f} is truncated" in inspect_error(ckpt)
    f.write_bytes(data[:5])
    assert "truncated or not a safetensors file" in _error(ckpt)


def test_padded_shard_is_named(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0" * 16)
    assert f"weight shard {f} has 16 bytes past the tensors" in _error(ckpt)


def test_wrong_header_is_named(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")  # a header longer than the file
    f.write_bytes(bytes(data))
    assert f"weight shard {f} is truncated or not a safetensors file" in _error(ckpt)
    data[:8] = (len(data) - 8).to_bytes(8, "little")  # the tensor bytes read as JSON
    f.write_bytes(bytes(data))
    assert f"weight shard {f} has an unreadable safetensors header (not JSON)" in _error(ckpt)


def test_header_span_that_disagrees_with_the_shape_is_named(ckpt):
    f = ckpt / "model.safetensors"
    name = "language_model.lm_head.weight"
    _rewrite_header(f, lambda header: header[name].update(shape=[32063, 64]))
    message = _error(ckpt)
    assert f"weight shard {f}: the header gives {name} F32 [32063, 64]" in message


def test_unreadable_tensor_data_names_the_shard(ckpt):
    """A header that passes the size checks but that safetensors refuses (an unknown dtype)."""
    f = ckpt / "model.safetensors"
    _rewrite_header(f, lambda header: header["projector.fc1.bias"].update(dtype="Q4"))
    assert _error(ckpt).startswith(f"weight shard {f} is unreadable: ")


@pytest.fixture
def sharded(ckpt):
    """The tiny checkpoint split into two shards with an index, as Hugging Face writes a large one."""
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, ckpt / name, {"format": "pt"})
    weight_map = {k: name for name, names in shards.items() for k in names}
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ckpt / INDEX_FILE).write_text(json.dumps(index))
    return ckpt, index


def _write_index(ckpt, index):
    (ckpt / INDEX_FILE).write_text(json.dumps(index))


def test_inspect_checks_shards_against_the_index(sharded, inspect_error):
    ckpt, index = sharded
    shown = _rtloop("inspect", str(ckpt))
    assert shown.returncode == 0, shown.stderr
    assert "2 file(s)" in shown.stdout and "130 tensors (headers match the file sizes and the index)" in shown.stdout

    moved = dict(index, weight_map=dict(index["weight_map"]))
    first = next(k for k, v in moved["weight_map"].items() if v.startswith("model-00001"))
    moved["weight_map"][first] = "model-00002-of-00002.safetensors"
    _write_index(ckpt, moved)
    assert f"maps {first} to model-00002-of-00002.safetensors, but it is in model-00001-of-00002.safetensors" in _error(ckpt)

    unlisted = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != first})
    _write_index(ckpt, unlisted)
    assert "model-00001-of-00002.safetensors holds 1 tensor(s) model.safetensors.index.json does not list" in _error(ckpt)

    wrong_total = dict(index, metadata={"total_size": index["metadata"]["total_size"] + 2})
    _write_index(ckpt, wrong_total)
    assert "gives total_size" in inspect_error(ckpt)
    load_checkpoint(ckpt)  # the keys and shapes are complete: loading does not depend on the total


def test_truncated_shard_of_a_sharded_checkpoint_is_named(sharded, inspect_error):
    ckpt, _ = sharded
    f = ckpt / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    assert f"weight shard {f} is truncated" in _error(ckpt)
    assert f"weight shard {f} is truncated" in inspect_error(ckpt)


def test_resize_strategy(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert OpenVLAConfig.from_dict(config).image_resize_strategy == "resize-naive"
    config["image_resize_strategy"] = "letterbox"
    (ckpt / "config.json").write_text(json.dumps(config))
    message = _error(ckpt)
    assert message == "config.json: image_resize_strategy 'letterbox' is not implemented; rtloop supports 'resize-naive'"


def test_statistics_with_the_wrong_action_dimension_are_named(ckpt, inspect_error):
    stats = json.loads((ckpt / "config.json").read_text())["norm_stats"]
    for k in ("q01", "q99", "mean", "std", "min", "max", "mask"):
        stats["libero_goal"]["action"][k] = stats["libero_goal"]["action"][k][:6]
    (ckpt / "dataset_statistics.json").write_text(json.dumps(stats))
    message = inspect_error(ckpt)
    assert f"{ckpt / 'dataset_statistics.json'}, key 'libero_goal': the action statistics have the wrong dimension" in message
    assert "q01 has 6 entries; OpenVLA's actions have 7" in message


def test_a_stale_cached_random_checkpoint_is_made_again(tiny_checkpoint, tmp_path, monkeypatch):
    """`rtloop run`'s fallback: a cached tiny checkpoint from an older generator (another action bias)
    is replaced, a current one reused."""
    from rtloop.commands.policies import TINY_CACHE_NAME, tiny_random_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = shutil.copytree(tiny_checkpoint, tmp_path / "rtloop" / TINY_CACHE_NAME)
    config = json.loads((cached / "config.json").read_text())
    config["rtloop_generated"]["action_bias"] = 1.0
    (cached / "config.json").write_text(json.dumps(config))
    assert tiny_random_checkpoint() == cached
    assert load_checkpoint(cached).config.generated["action_bias"] == 2.0
    before = (cached / "model.safetensors").stat().st_mtime_ns
    assert tiny_random_checkpoint() == cached and (cached / "model.safetensors").stat().st_mtime_ns == before
