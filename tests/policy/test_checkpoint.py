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
    assert loaded.config.generated == {"size": "tiny", "seed": 0, "random_weights": True}


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


def test_sharded_checkpoint_loads(ckpt):
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, ckpt / name, {"format": "pt"})
    weight_map = {k: name for name, names in shards.items() for k in names}
    (ckpt / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
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
