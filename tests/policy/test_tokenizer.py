import json

import pytest

from rtloop.errors import CheckpointError
from rtloop.policy.processor import build_prompt
from rtloop.policy.tokenizer import (
    LIBERO_INSTRUCTIONS,
    llama_shaped_model_proto,
    load_tokenizer,
    write_tokenizer_files,
)

INSTRUCTIONS = [
    "pick up the alphabet soup and place it in the basket",
    "put both the alphabet soup and the tomato sauce in the basket",
    "Open the top drawer and put the bowl inside",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out)
    return out


def test_llama2_layout(tok_dir):
    sp = load_tokenizer(tok_dir).sp
    assert sp.get_piece_size() == 32000
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    assert all(sp.is_byte(i) for i in range(3, 259))
    assert sp.id_to_piece(29871) == "▁" and not sp.is_unused(29871)
    assert sp.id_to_piece(13) == "<0x0A>"  # newline falls back to its byte, as in Llama-2


def test_generation_is_deterministic():
    assert llama_shaped_model_proto.__wrapped__() == llama_shaped_model_proto()


def test_embedded_instructions_match_installed_libero():
    import contextlib
    import io

    from libero.libero import benchmark

    with contextlib.redirect_stdout(io.StringIO()):  # the benchmark module prints task-order notes
        suites = benchmark.get_benchmark_dict()
        names = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
        installed = {suites[n]().get_task(i).language for n in names for i in range(suites[n]().n_tasks)}
    assert LIBERO_INSTRUCTIONS.splitlines() == sorted(installed)


def test_encode_prepends_bos_and_round_trips(tok_dir):
    tok = load_tokenizer(tok_dir)
    for instruction in INSTRUCTIONS:
        prompt = build_prompt(instruction)
        ids = tok.encode(prompt)
        assert ids[0] == 1 and 1 not in ids[1:]
        assert tok.decode(ids) == prompt
        assert not any(tok.sp.is_unused(i) for i in ids)  # filler pieces are never produced
        assert ids[-1] != 29871  # "Out:" ends in ":"; the processor appends "▁"
    ids = tok.encode("Grüße ✓")  # characters outside the vocabulary fall back to bytes, not <unk>
    assert 0 not in ids and tok.decode(ids) == "Grüße ✓"


def test_json_files_like_openvla(tok_dir):
    assert json.loads((tok_dir / "added_tokens.json").read_text()) == {"<PAD>": 32000}
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["pad_token"] == "<PAD>"
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    special = json.loads((tok_dir / "special_tokens_map.json").read_text())
    assert special["pad_token"]["content"] == "<PAD>" and special["bos_token"]["content"] == "<s>"


def test_same_ids_as_transformers_llama_tokenizer(tok_dir):
    pytest.importorskip("google.protobuf")  # transformers needs it to read a SentencePiece model
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(str(tok_dir))
    ours = load_tokenizer(tok_dir)
    assert hf.pad_token_id == 32000 and hf.convert_ids_to_tokens(29871) == "▁"
    for instruction in INSTRUCTIONS:
        prompt = build_prompt(instruction)
        assert hf(prompt).input_ids == ours.encode(prompt)


def test_missing_or_broken_tokenizer_model(tmp_path):
    with pytest.raises(CheckpointError, match="missing tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="not a SentencePiece model") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_other_sentencepiece_model_is_rejected(tmp_path):
    import sentencepiece as spm

    with open(tmp_path / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(["pick up the bowl", "open the drawer"] * 20),
                                       model_writer=f, vocab_size=30, model_type="bpe", minloglevel=2)
    with pytest.raises(CheckpointError, match=r"not a Llama-2 tokenizer \(30 pieces, id 29871 is None"):
        load_tokenizer(tmp_path)
