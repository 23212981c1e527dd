"""Fast batch decoding: one step of the student over a filled :class:`HybridCache`, replayed as a CUDA graph.

Eager decoding of a large model at batch 1..8 is launch-bound (hundreds of small kernels per layer). The student's
cache has a constant size, so a decode step is a fixed sequence of kernels over fixed buffers: it is captured
once as a CUDA graph and replayed. The forward writes new cache tensors; the step copies them back into the
static buffers the graph reads, so a replay is exactly one eager step. On CPU (or ``use_graph=False``) the same
step runs eagerly; the tests compare it with ``generate()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from xlstm_distill.modeling.cache import HybridCache, cache_of


class GraphedStep:
    """Runs ``step()`` eagerly or as a replayed CUDA graph.

    ``step`` must read its inputs from, and leave its results in, fixed tensors. ``state`` lists the tensors
    that ``step`` advances (cache, position): capture needs warm-up steps, whose effect on ``state`` is undone
    afterwards (other buffers they write, such as a static KV cache slot that the next step overwrites, are not).
    ``compile``: the step goes through ``torch.compile`` first (fused kernels: fewer launches per step); it is
    compiled during the warm-up (eagerly: on the first step).
    """

    def __init__(self, step: Callable[[], torch.Tensor], state: list[torch.Tensor], use_graph: bool, warmup: int = 2,
                 compile: bool = False) -> None:
        self.step = torch.compile(step, dynamic=False) if compile else step
        self.graph, self.output = None, None
        if not use_graph:
            return
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.step()
        for tensor, value in zip(state, saved):
            tensor.copy_(value)

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.output


class StaticDecoder:
    """Decode steps of a student continuing ``cache`` (filled by a prefill forward), CUDA-graphed on GPU,
    optionally compiled (``torch.compile`` traces the whole step as one graph). A student with full-attention heads
    keeps their K/V of every token: ``max_new_tokens`` reserves room for the steps to come (a step past it fails)."""

    def __init__(self, model: torch.nn.Module, cache: HybridCache, use_graph: bool | None = None,
                 compile: bool = False, max_new_tokens: int | None = None) -> None:
        if cache.is_empty:
            raise ValueError("StaticDecoder needs a filled cache: run the prompt through the model first (use_cache=True).")
        if cache.keeps_full:
            if max_new_tokens is None:
                raise ValueError("This student keeps full-attention heads, whose K/V grow with every token: pass "
                                 "StaticDecoder(..., max_new_tokens=N) to reserve room for N steps.")
            cache.reserve(cache.seen_tokens + max_new_tokens)
        self.model, self.cache = model, cache
        self.static = cache.tensors()
        self.input_ids = torch.zeros(cache.doc_length.shape[0], 1, dtype=torch.long, device=cache.doc_length.device)
        seen = cache.seen_tokens
        use_graph = self.input_ids.is_cuda if use_graph is None else use_graph
        self._run = GraphedStep(self._step, self.static, use_graph, compile=compile)
        cache.seen_tokens = seen

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        # The token count is Python bookkeeping that the step does not need, set by ``step``: a constant here (a
        # compiled step would otherwise specialize on the count and compile again at every step)
        self.cache.seen_tokens = 0
        logits = self.model(input_ids=self.input_ids, past_key_values=self.cache, use_cache=True).logits[:, -1]  # (B, V)
        for static, new in zip(self.static, self.cache.tensors()):  # the forward wrote new tensors: copy them back
            if new is not static:  # (the full-attention K/V are written in place)
                static.copy_(new)
        self.cache.set_tensors(self.static)
        return logits

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, 1) -> (B, V) logits of the next token
        """Feed one token per row; returns the next-token logits (a buffer overwritten by the next step)."""
        self.input_ids.copy_(input_ids)
        seen = self.cache.seen_tokens
        if self.cache.keeps_full and seen + 1 > self.cache.full_capacity:
            raise ValueError(f"The decoder reserved room for {self.cache.full_capacity} tokens in its full-attention "
                             "heads: build it with a larger max_new_tokens.")
        logits = self._run()  # a replayed graph runs no Python: the count is kept here
        self.cache.seen_tokens = seen + 1
        return logits


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    use_graph: bool | None = None) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` (B, T) (one document per row, no padding). Returns (B, max_new_tokens)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    out = model(input_ids=input_ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    decoder = StaticDecoder(model, cache_of(out), use_graph=use_graph, max_new_tokens=max_new_tokens)
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        token = decoder.step(token).argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)
