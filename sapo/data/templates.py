"""Prompt text from an Example: the tokenizer's chat template, or plain text.

The instruction appended to the question, in order of precedence: the ``instruction`` argument,
``example.meta["instruction"]`` (the built-in task sets "" so its prompt stays as generated),
then the default for ``example.meta["answer_format"]`` ("boxed", the default, or "####").
"""

from __future__ import annotations

from sapo.data.example import Example

DEFAULT_INSTRUCTIONS = {
    "boxed": "Please reason step by step, and put your final answer within \\boxed{}.",
    "####": "Please reason step by step, and write your final answer at the end after '####'.",
}
TEMPLATES = ("auto", "chat", "plain")


def instruction_for(example: Example, instruction: str | None = None) -> str:
    if instruction is not None:
        return instruction
    if "instruction" in example.meta:
        return example.meta["instruction"]
    answer_format = example.meta.get("answer_format", "boxed")
    if answer_format not in DEFAULT_INSTRUCTIONS:
        raise ValueError(f"example answer_format must be one of {list(DEFAULT_INSTRUCTIONS)}, got {answer_format!r}")
    return DEFAULT_INSTRUCTIONS[answer_format]


def has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _messages(example: Example, instruction: str) -> list[dict]:
    if isinstance(example.prompt, str):
        content = f"{example.prompt}\n\n{instruction}" if instruction else example.prompt
        return [{"role": "user", "content": content}]
    messages = [dict(m) for m in example.prompt]
    if instruction:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            messages.append({"role": "user", "content": instruction})
        elif isinstance(messages[last_user]["content"], str):
            messages[last_user]["content"] += f"\n\n{instruction}"
    return messages


def build_prompt(example: Example, tokenizer=None, template: str = "auto", instruction: str | None = None) -> str:
    """The prompt text the model continues.

    ``chat``: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``.
    ``plain``: the question, then the instruction on its own line and a newline; with an empty
    instruction the question is returned unchanged. ``auto``: chat when the tokenizer has a chat
    template, else plain."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    text_instruction = instruction_for(example, instruction)
    if template == "auto":
        template = "chat" if has_chat_template(tokenizer) else "plain"
    if template == "chat":
        if not has_chat_template(tokenizer):
            raise ValueError("template='chat' needs a tokenizer with a chat template; this one has none: "
                             "use template='plain'")
        return tokenizer.apply_chat_template(_messages(example, text_instruction), tokenize=False,
                                             add_generation_prompt=True)
    if isinstance(example.prompt, str):
        question = example.prompt
    else:
        question = "\n\n".join(m["content"] for m in example.prompt if isinstance(m.get("content"), str))
    return f"{question}\n{text_instruction}\n" if text_instruction else question
