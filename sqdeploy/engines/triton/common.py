"""What every repository writer shares: options, config files, Python models, tokenizers."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqdeploy.core.errors import SqDeployError
from sqdeploy.engines.triton.schema import to_pbtxt

PYTHON_MODELS = Path(__file__).parent / "python_models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int | None = None  # None: the engine's own limit (TensorRT-LLM), 8 otherwise
    streaming: bool = True  # decoupled transaction policy: token-by-token responses
    kv_cache_fraction: float = 0.9
    batch_scheduler_policy: str = "guaranteed_no_evict"
    max_queue_delay_us: int = 0
    instances: int = 1
    engine_path: str | None = None  # the engine path written into the config (default: absolute path here)
    tokenizer: Path | None = None
    device: str | None = None  # where the ONNX decoder runs: gpu | cpu; None: the device the export was made for
    default_max_tokens: int = 256


def write_config(model_dir: Path, config: dict[str, Any]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(to_pbtxt(config))
    (model_dir / "1").mkdir(exist_ok=True)


def install_python_model(model_dir: Path, source: str) -> None:
    """``1/model.py`` from our Python models, with the shared helpers beside it."""
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy(PYTHON_MODELS / f"{source}.py", version / "model.py")
    shutil.copy(PYTHON_MODELS / "common.py", version / "sqdeploy_triton.py")


def tokenizer_files(primary: Path, override: Path | None) -> list[Path]:
    """The tokenizer files beside the engine, or those of ``--tokenizer``; none is an error."""
    src = override or primary
    files = [src / f for f in TOKENIZER_FILES if (src / f).exists()]
    if not files:
        where = f"--tokenizer {override}" if override else f"{primary}"
        raise SqDeployError(f"no tokenizer files (tokenizer.json, tokenizer.model, ...) in {where}; pass --tokenizer HF_MODEL_DIR")
    return files


def copy_tokenizer(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / f.name)


def copy_file(src: Path, dest: Path) -> None:
    """A real copy, never a hard link: a link would share one inode with the export, so rewriting
    either file in place (``onnx.save`` to the same path, an editor) would change both."""
    shutil.copyfile(src, dest)


def launch_command(repo: Path, world_size: int = 1, rank_models: tuple[str, ...] = ()) -> str:
    """The exact server command: one tritonserver, or one per rank under mpirun (leader mode)."""
    if world_size == 1:
        return f"tritonserver --model-repository={repo}"
    parts = ["mpirun --allow-run-as-root"]
    for rank in range(world_size):
        cmd = f"-n 1 tritonserver --model-repository={repo} --disable-auto-complete-config"
        cmd += f" --backend-config=python,shm-region-prefix-name=prefix{rank}_"
        if rank:
            cmd += " --model-control-mode=explicit" + "".join(f" --load-model={m}" for m in rank_models)
        parts.append(cmd)
    return " \\\n  ".join(parts[:1] + [p + (" :" if i < world_size - 1 else "") for i, p in enumerate(parts[1:])])


def write_launch_script(repo: Path, command: str) -> None:
    script = repo / "launch.sh"
    # PYTHONDONTWRITEBYTECODE: the Python models' imports leave no __pycache__ inside the repository
    script.write_text("#!/bin/sh\n# Start Triton on this model repository (written by sq-build).\n"
                      "export PYTHONDONTWRITEBYTECODE=1\nexec " + command + "\n")
    script.chmod(0o755)
