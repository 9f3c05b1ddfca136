import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sapo.models.char_tokenizer import build_char_tokenizer

ALPHABET = "0123456789+-=* \n"


def test_one_id_per_character_after_special_tokens():
    tokenizer = build_char_tokenizer(ALPHABET)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 4 + len(ALPHABET)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("12+3\n")["input_ids"]
    assert ids == [4 + ALPHABET.index(c) for c in "12+3\n"]


def test_decode_joins_characters_and_skips_specials():
    tokenizer = build_char_tokenizer(ALPHABET)
    text = "7 * 8 = 56\n9"
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids) == text + "<eos>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("1<eos>")["input_ids"] == [5, 2]


def test_unknown_character_and_bos_option():
    assert build_char_tokenizer("ab")("ac")["input_ids"] == [4, 3]
    assert build_char_tokenizer("ab", add_bos=True)("ab")["input_ids"] == [1, 4, 5]


def test_left_padding_batch():
    tokenizer = build_char_tokenizer(ALPHABET)
    batch = tokenizer(["1", "123"], padding=True, padding_side="left")
    assert batch["input_ids"] == [[0, 0, 5], [5, 6, 7]]
    assert batch["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


@pytest.mark.parametrize("add_bos", [False, True])
def test_save_and_auto_load_round_trip(tmp_path, add_bos):
    tokenizer = build_char_tokenizer(ALPHABET, add_bos=add_bos)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "12 + 30 = 42\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token, loaded.eos_token) == ("<pad>", "<eos>")


@pytest.mark.parametrize("alphabet", ["", "abca"])
def test_bad_alphabet_rejected(alphabet):
    with pytest.raises(ValueError, match="alphabet"):
        build_char_tokenizer(alphabet)
