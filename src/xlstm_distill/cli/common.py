"""What the command groups share: option parsing, defaults read from the config classes, clear errors."""

from __future__ import annotations

import inspect
from typing import Any

import typer
import yaml

from xlstm_distill.kernels import KernelOptions
from xlstm_distill.modeling import HybridConfig

DTYPES = ("float32", "bfloat16", "float16")


def student_default(name: str) -> Any:
    """The default of one of HybridConfig's settings (the single place the student's defaults live)."""
    return inspect.signature(HybridConfig.__init__).parameters[name].default


def torch_dtype(name: str | None, device: str = "cpu"):
    """``float32`` / ``bfloat16`` / ``float16`` (``auto`` or None: bfloat16 on CUDA, float32 elsewhere)."""
    import torch

    if name is None or name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}", param_hint="--dtype")
    return getattr(torch, name)


def fail(message: str) -> typer.Exit:
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=1)


def split_commas(values: list[str] | None) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def parse_sizes(text: str) -> list[int]:
    """'1k,4k,32768' -> [1024, 4096, 32768]."""
    try:
        return [int(float(s[:-1]) * 1024) if s.lower().endswith("k") else int(s) for s in split_commas([text])]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated sizes such as 1k,4k,8k, got {text!r}") from None


def parse_assignments(values: list[str] | None, option: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` (or ``["a=1,b=2"]``) -> ``{"a": "1", "b": "2"}`` with a clear error otherwise."""
    out: dict[str, str] = {}
    for item in split_commas(values):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise typer.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint=option)
        out[key.strip()] = value.strip()
    return out


def kernel_options(assignments: list[str] | None, backend: str | None = None) -> KernelOptions:
    """KernelOptions from ``--kernel NAME=VALUE`` options (values in YAML syntax) and a ``--backend`` shorthand."""
    values = {key: yaml.safe_load(value) for key, value in parse_assignments(assignments, "--kernel").items()}
    try:
        options = KernelOptions.of(values)
        if backend is not None:
            options = HybridConfig(kernels=options, backend=backend).kernels
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--kernel / --backend") from None
    return options


KERNEL_HELP = ("Kernel option NAME=VALUE (repeatable), e.g. --kernel copy_sinks=none; see docs/recipes.md "
               "(student.kernels).")
