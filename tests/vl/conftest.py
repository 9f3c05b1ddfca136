"""Tiny Qwen3-VL pieces built offline: the char tokenizer + vision tokens, a random tiny VL model."""

import pytest

from sapo.data.builtin import BUILTIN_ALPHABET
from sapo.models.char_tokenizer import build_char_tokenizer
from sapo.models.vl import build_tiny_vl


def tiny_vl(arch: str = "qwen3_vl", seed: int = 0):
    """(model, processor): the default tiny config (text hidden 64, 2 layers; vision depth 2)."""
    model, processor = build_tiny_vl(arch, build_char_tokenizer(BUILTIN_ALPHABET), seed=seed)
    return model.eval(), processor


@pytest.fixture(scope="module")
def vl():
    return tiny_vl()


@pytest.fixture(scope="module")
def processor(vl):
    return vl[1]
