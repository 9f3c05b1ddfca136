"""A character-level tokenizer for the built-in CPU task, as a real Hugging Face fast tokenizer.

One token per character of the alphabet, plus the special tokens below. Because it is a genuine
`PreTrainedTokenizerFast`, `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip and the
rest of the library treats it like any other HF tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
# Fixed ids 0..3 so models built for one alphabet keep their special ids.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)


def build_char_tokenizer(alphabet: str, *, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Tokenizer with ids `<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, then one id per alphabet character.

    `add_bos=True` prepends `<bos>` to every encoded text; `<eos>` is never added automatically
    (completions end with it because the model learns to emit it).
    Characters outside the alphabet encode to `<unk>`.
    """
    if not alphabet:
        raise ValueError("alphabet is empty: pass the characters the task uses, e.g. '0123456789+-= '")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"alphabet repeats characters {repeated!r}: each character must appear once")

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in alphabet:
        vocab[char] = len(vocab)

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every single character (newlines included) is its own pre-token.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without separators
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A $B",
            special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
