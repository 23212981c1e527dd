"""What the package's torch.compile'd functions share."""

from __future__ import annotations

import contextlib

import torch


def many_variants() -> contextlib.AbstractContextManager:
    """Each dtype, window, batch layout, grad mode and autocast state is one more compiled variant of a function;
    past dynamo's default recompile limit (8) a call runs uncompiled (FlexAttention then materializes T x T scores),
    so the package's compiled calls get a larger one (nothing to change inside a model the user compiles as a whole)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(cache_size_limit=max(torch._dynamo.config.cache_size_limit, 64))
