import pytest

from sapo.data.builtin import builtin_dataset
from sapo.data.example import Example
from sapo.data.templates import DEFAULT_INSTRUCTIONS, build_prompt
from sapo.models.char_tokenizer import build_char_tokenizer

CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = build_char_tokenizer("abc")
    tokenizer.chat_template = CHAT
    return tokenizer


def test_plain_default_instruction_boxed_and_hash():
    assert build_prompt(Example("What is 1+1?", "2"), template="plain") == (
        "What is 1+1?\n" + DEFAULT_INSTRUCTIONS["boxed"] + "\n")
    example = Example("Q", "2", meta={"answer_format": "####"})
    assert build_prompt(example, template="plain").endswith("after '####'.\n")
    assert build_prompt(example, template="plain", instruction="") == "Q"


def test_builtin_prompt_is_left_as_generated():
    example = builtin_dataset("train", 1)[0]
    assert build_prompt(example, build_char_tokenizer("0123456789+-*=()# \n"), template="auto") == example.prompt


def test_chat_template_with_generation_prompt(chat_tokenizer):
    text = build_prompt(Example("Q", "2"), chat_tokenizer, template="chat", instruction="Box it.")
    assert text == "<user>Q\n\nBox it.\n<assistant>"
    assert build_prompt(Example("Q", "2"), chat_tokenizer, instruction="Box it.") == text  # auto -> chat


def test_chat_messages_get_instruction_on_last_user_turn(chat_tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    text = build_prompt(Example(messages, "1"), chat_tokenizer, template="chat", instruction="I")
    assert text == "<system>S\n<user>Q\n\nI\n<assistant>"
    assert messages[1]["content"] == "Q"  # the example is not modified


def test_chat_without_template_and_bad_template():
    with pytest.raises(ValueError, match="template='plain'"):
        build_prompt(Example("Q", "1"), build_char_tokenizer("abc"), template="chat")
    with pytest.raises(ValueError, match="template must be one of"):
        build_prompt(Example("Q", "1"), template="jinja")
