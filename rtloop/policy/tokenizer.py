"""The OpenVLA tokenizer: Llama-2's SentencePiece model plus `<PAD>` = 32000.

Loading: `load_tokenizer(checkpoint_dir)` reads `tokenizer.model` with the `sentencepiece` package and
`encode(prompt)` returns what Hugging Face's LlamaTokenizer(Fast) returns for OpenVLA: BOS (1), then
SentencePiece's ids with the dummy-prefix "▁" that Llama-2's normalizer adds.

Generating: no tokenizer can be downloaded here, so `write_tokenizer_files(dir)` builds one with the real
Llama-2 layout and on-disk format: a BPE ModelProto with byte fallback, `<unk>`=0 `<s>`=1 `</s>`=2, the 256
byte pieces `<0x00>`..`<0xFF>` at 3..258, merged pieces from 259, single characters from 29871 ("▁" first,
as in Llama-2), 32000 pieces in all, plus the JSON files the OpenVLA checkpoint ships. The pieces come from
training SentencePiece on LIBERO's task instructions and some English; the unused slots between the
learned merges and the characters (and after the characters) are filled with UNUSED-type pieces, which
SentencePiece never produces. The ModelProto is edited at the protobuf wire level, so no `protobuf`
dependency is needed.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from rtloop.errors import CheckpointError

N_PIECES = 32000
BOS_ID = 1
EOS_ID = 2
SPACE_ID = 29871  # Llama-2's "▁": the first single-character piece
PAD_ID = 32000
PAD_TOKEN = "<PAD>"
FIRST_MERGE_ID = 259  # after <unk>, <s>, </s> and the 256 byte pieces

# SentencePiece ModelProto.SentencePiece.Type values
NORMAL, UNUSED, BYTE = 1, 5, 6


@dataclass
class Tokenizer:
    """Llama-2 SentencePiece plus the `<PAD>` token OpenVLA adds."""

    sp: spm.SentencePieceProcessor

    def encode(self, text: str) -> list[int]:
        return [BOS_ID] + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.sp.get_piece_size()])  # drops <PAD>


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    path = Path(checkpoint_dir) / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {checkpoint_dir} is missing tokenizer.model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a SentencePiece model: {str(e).splitlines()[0]}") from None
    space = sp.id_to_piece(SPACE_ID) if sp.get_piece_size() > SPACE_ID else None
    if sp.get_piece_size() != N_PIECES or space != "▁" or sp.bos_id() != BOS_ID:
        raise CheckpointError(
            f"{path} is not a Llama-2 tokenizer ({sp.get_piece_size()} pieces, id {SPACE_ID} is {space!r}, "
            f"BOS id {sp.bos_id()}); OpenVLA needs 32000 pieces, '▁' at 29871, BOS 1"
        )
    return Tokenizer(sp)


# --- generating a Llama-2-shaped tokenizer -----------------------------------------------------------

ENGLISH = """\
A robot arm stands next to a kitchen table. The camera looks at the scene from above and in front.
Pick up the red block and place it on the green block. Open the drawer, then close it again.
Move the gripper to the left of the cup, lower it slowly, and grasp the handle.
What should the robot do next? It should put the bowl in the sink and turn off the stove.
The policy reads an image and an instruction, and it predicts seven numbers: a change in position,
a change in orientation, and whether the gripper is open or closed.
Wipe the table with the sponge. Push the plate to the front. Stack the blocks from largest to smallest.
In: What action should the robot take to pick up the spoon?
Out:
Seven tokens are generated for each action; every token selects one of 256 bins.
The quick brown fox jumps over the lazy dog. Numbers like 0 1 2 3 4 5 6 7 8 9 are split into digits.
"""


def _training_corpus() -> list[str]:
    instructions = LIBERO_INSTRUCTIONS.splitlines()
    prompts = [f"In: What action should the robot take to {s}?" for s in instructions]
    return instructions + prompts + ["Out:"] * 10 + ENGLISH.splitlines()


# Protobuf wire format, just enough for ModelProto: (field number, wire type, payload) triples, where the
# payload is an int for varints and bytes otherwise.
def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, pos


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _parse(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((field, wire, value))
    return fields


def _serialize(fields: list[tuple[int, int, int | bytes]]) -> bytes:
    out = bytearray()
    for field, wire, value in fields:
        out += _varint(field << 3 | wire)
        if wire == 0:
            out += _varint(value)
        elif wire == 2:
            out += _varint(len(value)) + value
        else:
            out += value
    return bytes(out)


def _piece(text: str, score: float, kind: int) -> bytes:
    return _serialize([(1, 2, text.encode()), (2, 5, struct.pack("<f", score)), (3, 0, kind)])


@functools.lru_cache(maxsize=1)
def llama_shaped_model_proto() -> bytes:
    """The generated tokenizer.model bytes: deterministic, cached for the process."""
    trained = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_corpus()), model_writer=trained, model_type="bpe", vocab_size=1500,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False, minloglevel=2,
    )
    fields = _parse(trained.getvalue())
    pieces = [dict((f, v) for f, _, v in _parse(p)) for f, _, p in fields if f == 1]
    texts = [p[1].decode() for p in pieces]
    kinds = [p.get(3, NORMAL) for p in pieces]
    assert texts[:3] == ["<unk>", "<s>", "</s>"] and all(k == BYTE for k in kinds[3:FIRST_MERGE_ID])
    learned = texts[FIRST_MERGE_ID:]
    first_char = next(i for i, t in enumerate(learned) if len(t) == 1)  # the trainer lists characters last
    merges, chars = learned[:first_char], learned[first_char:]
    assert chars[0] == "▁" and all(len(t) == 1 for t in chars), "unexpected trainer output layout"

    def filler(start: int, stop: int) -> list[tuple[str, int]]:
        return [(f"<unused{i}>", UNUSED) for i in range(start, stop)]

    layout = [(t, NORMAL) for t in merges] + filler(FIRST_MERGE_ID + len(merges), SPACE_ID)
    layout += [(t, NORMAL) for t in chars] + filler(SPACE_ID + len(chars), N_PIECES)
    out = [(1, 2, p) for f, _, p in fields if f == 1][:FIRST_MERGE_ID]
    # Llama-2 scores: 0 for specials and bytes, then -(id - 259), so BPE merges keep their learned order.
    out += [(1, 2, _piece(t, -float(i), kind)) for i, (t, kind) in enumerate(layout)]
    for field, wire, value in fields:
        if field == 2:  # trainer_spec: record the real vocabulary size (field 4)
            spec = [(f, w, v) for f, w, v in _parse(value) if f != 4] + [(4, 0, N_PIECES)]
            out.append((2, 2, _serialize(spec)))
        elif field != 1:
            out.append((field, wire, value))
    return _serialize(out)


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_tokenizer_files(out_dir: str | Path) -> None:
    """tokenizer.model, tokenizer_config.json, special_tokens_map.json and added_tokens.json, shaped like
    the openvla-7b checkpoint's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(llama_shaped_model_proto())
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": PAD_TOKEN, "unk_token": "<unk>"}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): _added_token(t) for i, t in
                                 [(0, "<unk>"), (BOS_ID, "<s>"), (EOS_ID, "</s>"), (PAD_ID, PAD_TOKEN)]},
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 2048,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False,
        **specials,
    }
    special_map = {k: {key: v for key, v in _added_token(t).items() if key != "special"}
                   for k, t in specials.items()}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (out / "added_tokens.json").write_text(json.dumps({PAD_TOKEN: PAD_ID}, indent=2) + "\n")


# Every task instruction of LIBERO's spatial, object, goal, 10 and 90 suites (sorted, deduplicated), copied
# from the libero package so that generation needs no LIBERO install (the GPU machines have none) and gives
# the same bytes everywhere; tests/policy/test_tokenizer.py checks the copy against the installed package.
LIBERO_INSTRUCTIONS = """\
close the bottom drawer of the cabinet
close the bottom drawer of the cabinet and open the top drawer
close the microwave
close the top drawer of the cabinet
close the top drawer of the cabinet and put the black bowl on top of it
open the bottom drawer of the cabinet
open the microwave
open the middle drawer of the cabinet
open the top drawer and put the bowl inside
open the top drawer of the cabinet
open the top drawer of the cabinet and put the bowl in it
pick up the alphabet soup and place it in the basket
pick up the alphabet soup and put it in the basket
pick up the alphabet soup and put it in the tray
pick up the bbq sauce and place it in the basket
pick up the black bowl between the plate and the ramekin and place it on the plate
pick up the black bowl from table center and place it on the plate
pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate
pick up the black bowl next to the cookie box and place it on the plate
pick up the black bowl next to the plate and place it on the plate
pick up the black bowl next to the ramekin and place it on the plate
pick up the black bowl on the cookie box and place it on the plate
pick up the black bowl on the left and put it in the tray
pick up the black bowl on the ramekin and place it on the plate
pick up the black bowl on the stove and place it on the plate
pick up the black bowl on the wooden cabinet and place it on the plate
pick up the book and place it in the back compartment of the caddy
pick up the book and place it in the front compartment of the caddy
pick up the book and place it in the left compartment of the caddy
pick up the book and place it in the right compartment of the caddy
pick up the book in the middle and place it on the cabinet shelf
pick up the book on the left and place it on top of the shelf
pick up the book on the right and place it on the cabinet shelf
pick up the book on the right and place it under the cabinet shelf
pick up the butter and place it in the basket
pick up the butter and put it in the basket
pick up the butter and put it in the tray
pick up the chocolate pudding and place it in the basket
pick up the chocolate pudding and put it in the tray
pick up the cream cheese and place it in the basket
pick up the cream cheese and put it in the tray
pick up the cream cheese box and put it in the basket
pick up the ketchup and place it in the basket
pick up the ketchup and put it in the basket
pick up the ketchup and put it in the tray
pick up the milk and place it in the basket
pick up the milk and put it in the basket
pick up the orange juice and place it in the basket
pick up the orange juice and put it in the basket
pick up the red mug and place it to the right of the caddy
pick up the salad dressing and place it in the basket
pick up the salad dressing and put it in the tray
pick up the tomato sauce and place it in the basket
pick up the tomato sauce and put it in the basket
pick up the tomato sauce and put it in the tray
pick up the white mug and place it to the right of the caddy
pick up the yellow and white mug and place it to the right of the caddy
push the plate to the front of the stove
put both moka pots on the stove
put both the alphabet soup and the cream cheese box in the basket
put both the alphabet soup and the tomato sauce in the basket
put both the cream cheese box and the butter in the basket
put the black bowl at the back on the plate
put the black bowl at the front on the plate
put the black bowl in the bottom drawer of the cabinet
put the black bowl in the bottom drawer of the cabinet and close it
put the black bowl in the top drawer of the cabinet
put the black bowl on the plate
put the black bowl on top of the cabinet
put the bowl on the plate
put the bowl on the stove
put the bowl on top of the cabinet
put the butter at the back in the top drawer of the cabinet and close it
put the butter at the front in the top drawer of the cabinet and close it
put the chocolate pudding in the top drawer of the cabinet and close it
put the chocolate pudding to the left of the plate
put the chocolate pudding to the right of the plate
put the cream cheese in the bowl
put the frying pan on the cabinet shelf
put the frying pan on the stove
put the frying pan on top of the cabinet
put the frying pan under the cabinet shelf
put the ketchup in the top drawer of the cabinet
put the middle black bowl on the plate
put the middle black bowl on top of the cabinet
put the moka pot on the stove
put the red mug on the left plate
put the red mug on the plate
put the red mug on the right plate
put the right moka pot on the stove
put the white bowl on the plate
put the white bowl on top of the cabinet
put the white bowl to the right of the plate
put the white mug on the left plate
put the white mug on the left plate and put the yellow and white mug on the right plate
put the white mug on the plate
put the white mug on the plate and put the chocolate pudding to the right of the plate
put the wine bottle in the bottom drawer of the cabinet
put the wine bottle on the rack
put the wine bottle on the wine rack
put the wine bottle on top of the cabinet
put the yellow and white mug in the microwave and close it
put the yellow and white mug on the right plate
put the yellow and white mug to the front of the white mug
stack the black bowl at the front on the black bowl in the middle
stack the left bowl on the right bowl and place them in the tray
stack the middle black bowl on the back black bowl
stack the right bowl on the left bowl and place them in the tray
turn off the stove
turn on the stove
turn on the stove and put the frying pan on it
turn on the stove and put the moka pot on it
"""
