"""The model's tokenizer, loaded from its directory, and the check that it belongs to the model."""

from __future__ import annotations

from pathlib import Path

from sqdeploy.core.errors import SqDeployError


def load_tokenizer(path: Path):
    """transformers' AutoTokenizer from a local directory; any failure is one line naming the directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise SqDeployError(f"{path}: the tokenizer could not be loaded ({type(exc).__name__}); "
                            "the directory needs the model's tokenizer files (tokenizer.json, tokenizer_config.json)") from None


def check_tokenizer_fits(tokenizer, vocab_size: int, where: Path) -> None:
    """A tokenizer with more tokens than the embedding has rows would index past it."""
    if len(tokenizer) > vocab_size:
        raise SqDeployError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab_size}; "
                            "the tokenizer belongs to another model")
