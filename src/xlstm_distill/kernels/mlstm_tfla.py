"""mLSTM through NX-AI's `mlstm_kernels` (optional extra ``xlstm-distill[gpu]``): TFLA Triton kernels on CUDA.

Same function as :func:`xlstm_distill.kernels.mlstm_native.mlstm_chunkwise` (tested against it), with three adaptations:
- `mlstm_kernels` scales q by DHQK^-0.5 internally; our feature maps own the scale, so q is multiplied back.
- it takes the forget gate *pre-activation* (logsigmoid inside), and float32 gates (bf16 gates crash Triton 3.6).
- it needs a length divisible by the chunk size: the tail is padded with tokens that write nothing (input gate -30)
  and keep the state (forget pre-activation +30), so outputs and the final state are unchanged.
Its launch grid has B * NH * S / chunk programs on CUDA's third axis (at most 65,535): longer inputs are run in groups
of heads (independent of each other), e.g. 128K tokens x 32 heads in two calls.
Document resets (packed sequences) are forget gates of -100 at the first token of a document: the old state is
scaled by exp(-100) (0 in float32 next to the new document's terms), so the kernel needs no reset support.

Exact gradient: mlstm_kernels' backward treats the normalizer max(|q n|, exp(-m)) + eps as a constant (dv is exact,
dq, dk and the gates' gradients are not; docs/decisions.md). When q, k or the gates need a gradient, v gets a column
of ones: the kernel's last output column is then w = q n / (normalizer + eps), and its backward differentiates that
column as it does the others; the gradient of w then carries the normalizer's part on the tokens whose normalizer is
|q n| (`_add_normalizer_gradient`, a custom autograd function; the branch found from each token's stabilizer m).
Cost: one more value column (docs/decisions.md has the timings). The kernel still holds m constant: exact up to
eps (the function depends on m only through eps).

The kernel's forward and backward are two custom operators (``torch.ops.xlstm_distill.tfla_forward`` /
``tfla_backward``): torch.compile keeps each as one opaque call, so a whole student compiles with fullgraph=True.

With gradients, the Triton kernel keeps the chunk states of its forward for the backward (``recompute_states_in_bw``
off) instead of computing them again there: float32 (DHQK, DHV + 1) per chunk of 128 tokens and head, 137 MB per
layer at 8K tokens and 32 heads of 128, 543 MB at 32K (docs/decisions.md has the timings;
``KernelOptions(keep_chunk_states=False)`` trades the time back for the memory).

The settings of :class:`~xlstm_distill.kernels.options.KernelOptions` that apply here: ``keep_chunk_states``,
``exact_gradient``, ``tfla_min_chunk`` and ``tfla_kernel_params``.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from xlstm_distill.kernels import mlstm_native as mlstm
from xlstm_distill.kernels.mlstm_native import MLSTMState
from xlstm_distill.kernels.options import KernelOptions
from xlstm_distill.kernels.registry import MLSTM_KERNELS_AVAILABLE, register_kernel

PAD_INPUT_GATE, PAD_FORGET_GATE = -30.0, 30.0
RESET_FORGET_GATE = -100.0
MAX_GRID_Z = 65_535  # CUDA's limit on a launch grid's third dimension
# relative error of the kernel's w = q n / (normalizer + eps): a token is on the |q n| branch where |w| reaches the
# kink's value 1 / (1 + eps exp(m)) within it. A wider band gives exp(-m)-branch tokens that close to the kink the
# other branch's gradient (measured on CPU: one such token 4e-5 below the kink put 2-5% error into the whole dq), a narrower
# one misses |q n| tokens whose w came out below it: 16-bit outputs are rounded, on CUDA float32 dots run in TF32, and
# where eps exp(m) is large the kernel's float32 gate sums move the kink by up to their rounding (7e-6 seen).
W_ERROR = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}
W_ERROR_TF32 = 3e-3


AVAILABLE = MLSTM_KERNELS_AVAILABLE
DEFAULT_OPTIONS = KernelOptions()


def mlstm_tfla(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S) input gate pre-activation
    f: torch.Tensor,  # (B, NH, S) forget gate pre-activation (not its logsigmoid)
    state: MLSTMState | None = None,
    chunk_size: int = 64,
    reset: torch.Tensor | None = None,  # (B, S) bool, True at the first token of a document
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM via `mlstm_kernels`. Returns h (B, NH, S, DHV) in q's dtype and the final state.
    ``options.exact_gradient=False`` keeps mlstm_kernels' own backward (normalizer held constant) and skips the extra
    value column."""
    B, NH, S, DHQK = q.shape
    DHV = v.shape[-1]
    keep_states = options.keep_chunk_states and torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v, i, f))
    # dv is exact without it: the extra column is for the gradients of q, k and the gates
    augment = options.exact_gradient and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, i, f))
    if augment:  # (B, NH, S, DHV + 1): the last output column is q n / normalizer, C's last column is n
        v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
        if state is not None:
            state = MLSTMState(torch.cat([state.C, state.n.unsqueeze(-1)], -1), state.n, state.m)
    chunk, pad = kernel_layout(S, chunk_size, q.is_cuda, options.tfla_min_chunk)
    params = options.tfla_params_json()
    i, f = i.float(), f.float()
    if reset is not None:
        f = torch.where(reset[:, None, :], RESET_FORGET_GATE, f)
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        i = torch.nn.functional.pad(i, (0, pad), value=PAD_INPUT_GATE)
        f = torch.nn.functional.pad(f, (0, pad), value=PAD_FORGET_GATE)
    kernel_args = (q * math.sqrt(DHQK), k, v, i, f)
    initial = () if state is None else _kernel_state(state)
    rows = max(1, MAX_GRID_Z // max(1, (S + pad) // chunk))  # (B * NH) rows per call
    if rows >= B * NH:
        h, last = _call(kernel_args, initial, chunk, keep_states, params)
    else:  # heads in groups that fit the launch grid
        flat = [x.flatten(0, 1).unsqueeze(1) for x in (*kernel_args, *initial)]  # (B * NH, 1, ...)
        parts = [_call(group[:5], group[5:], chunk, keep_states, params)
                 for group in zip(*(x.split(rows) for x in flat))]
        h = torch.cat([p[0] for p in parts]).view(B, NH, S + pad, -1)
        last = tuple(torch.cat([p[1][n] for p in parts]).view(B, NH, *parts[0][1][n].shape[2:]) for n in range(3))
    C, n, m = last
    h = h[:, :, :S]
    if augment:
        h = _add_normalizer_gradient(h, _stabilizer(i[..., :S], f[..., :S], initial[2] if initial else None))
    # contiguous: the CPU kernel's last states are views into all chunk states (a cache would keep them all alive,
    # and a compiled decode step guards on their strides); the Triton kernel's already are
    return h, MLSTMState(*(x.float().contiguous() for x in (C[..., :DHV], n, m)))


def _kernel_state(state: MLSTMState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The state as the kernel's initial (C, n, m). A row that has seen no token yet (m = -inf, e.g. padding only)
    starts as mlstm_kernels starts without a state (C = 0, n = 0, m = 0), row by row and on the device: no host read
    (a device sync, and a graph break under torch.compile)."""
    started = torch.isfinite(state.m)  # (B, NH)
    return (torch.where(started[..., None, None], state.C, 0.0), torch.where(started[..., None], state.n, 0.0),
            torch.where(started, state.m, 0.0))


def kernel_layout(S: int, chunk_size: int, cuda: bool, min_chunk: int = DEFAULT_OPTIONS.tfla_min_chunk) -> tuple[int, int]:
    """The kernel's chunk size and the padding S needs. The Triton kernel takes S in {16, 32, 64} or a multiple of
    128, chunks a power of two (at least ``min_chunk``: 128 took 12% less time than 64, fwd+bwd at 8K on an H100);
    short inputs are all padded to 64, so that under torch.compile (``attention.memory_and_mix``) one symbolic length
    serves every short input (a rule on S's bits, a power of two per input, compiled each short length anew). The CPU
    kernel takes chunks of at most S tokens."""
    if cuda:
        chunk = max(min_chunk, 1 << (chunk_size - 1).bit_length())
        return chunk, (64 - S if S <= 64 else -S % math.lcm(128, chunk))
    chunk = min(chunk_size, S)
    return chunk, -S % chunk


def _stabilizer(
    i: torch.Tensor,  # (B, NH, S) input gate pre-activations
    f: torch.Tensor,  # (B, NH, S) forget gate pre-activations
    m0: torch.Tensor | None,  # (B, NH) the initial state's stabilizer
) -> torch.Tensor:  # (B, NH, S) float64
    """Each token's stabilizer m_t = max(m0 + b_t, max_{s <= t} i_s + b_t - b_s), b = cumsum(logsigmoid(f)): the
    running maximum of the log gate products that the kernel divides by. Without a state mlstm_kernels starts the
    stabilizer at m0 = 0 (the native kernel at -inf: the same function, up to eps)."""
    b = torch.nn.functional.logsigmoid(f.detach().double()).cumsum(-1)
    m = b + torch.cummax(i.detach().double() - b, dim=-1).values
    return torch.maximum(m, b + (0.0 if m0 is None else m0.double().unsqueeze(-1)))


def _add_normalizer_gradient(
    h: torch.Tensor,  # (B, NH, S, DHV + 1) the kernel's output on v with a column of ones
    m: torch.Tensor,  # (B, NH, S) each token's stabilizer
) -> torch.Tensor:  # (B, NH, S, DHV)
    """The outputs u, with the normalizer's term added to their gradient: h = N / (max(|s|, exp(-m)) + eps) has
    dh = du - u sign(w) dw where the normalizer is |s| = |q n| (w = s / (normalizer + eps), the last column). That
    branch is |s| >= exp(-m), i.e. |w| >= 1 / (1 + eps exp(m)). The forward value is u, unchanged."""
    w = h[..., -1:].detach()
    error = W_ERROR_TF32 if h.is_cuda and h.dtype == torch.float32 else W_ERROR[h.dtype]
    kink = 1 / (1 + mlstm.EPS * torch.exp(m)).unsqueeze(-1)  # |w| where |s| = exp(-m)
    on_qn = w.abs() >= kink * (1 - error)
    return _NormalizerGradient.apply(h, torch.where(on_qn, torch.sign(w), 0.0).to(h.dtype))


class _NormalizerGradient(torch.autograd.Function):
    """Forward: the view u = h[..., :-1]. Backward: du -> (du, -(du . u) c) with c = sign(w) on the |q n| branch,
    else 0, in one pass (the gradient of u - c u (|w| - |w|.detach()), without its element-wise forward work)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:  # (B, NH, S, DHV + 1), (B, NH, S, 1)
        ctx.save_for_backward(h, coef)
        return h[..., :-1]

    @staticmethod
    @once_differentiable  # first-order only (the training losses need no more)
    def backward(ctx, du: torch.Tensor) -> tuple[torch.Tensor, None]:  # (B, NH, S, DHV)
        h, coef = ctx.saved_tensors
        accumulate = torch.promote_types(du.dtype, torch.float32)  # 16-bit products, float32 sums
        dw = (du * h[..., :-1]).sum(-1, keepdim=True, dtype=accumulate) * -coef
        return torch.cat([du, dw.to(du.dtype)], -1), None


def _call(args: tuple[torch.Tensor, ...], initial: tuple[torch.Tensor, ...], chunk: int, keep_states: bool,
          params: str):
    """One kernel call: h (B, NH, S, DHV) and the last (C, n, m) with m as (B, NH). ``keep_states``: the forward's
    chunk states are kept for the backward (CUDA; the CPU kernel always recomputes them); ``params``: the Triton
    launch settings as JSON. Under autocast q, k, v go in as bf16 (what mlstm_kernels' own autograd function does;
    the gates stay float32)."""
    q, k, v, i, f = args
    if q.is_cuda and torch.is_autocast_enabled("cuda"):
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    c0, n0, m0 = initial or (None, None, None)
    out = torch.ops.xlstm_distill.tfla_forward(q, k, v, i, f, c0, n0, None if m0 is None else m0.unsqueeze(-1), chunk,
                                               keep_states and q.is_cuda, params)
    h, C, n, m = out[0], *out[3:6]
    return h, (C, n, m.squeeze(-1))


def _same_dispatch_keys():
    """mlstm_kernels compiles its gate helpers with torch.compile, and dynamo guards on the dispatch keys its inputs
    carry. A custom operator with gradients runs below ADInplaceOrView (as autograd.Function.apply does), without
    gradients (the backward operator, inference) above it: the helpers compiled again between forward and backward.
    Both operators run their kernels below it."""
    return torch._C._AutoDispatchBelowADInplaceOrView()


# mlstm_kernels' chunkwise forward and backward as two custom operators (Triton TFLA on CUDA, its PyTorch twin on
# CPU): torch.compile sees them as single ops with known output shapes (no graph break, also with fullgraph=True),
# and the autograd registration below pairs them as mlstm_kernels' own autograd function does.
@torch.library.custom_op("xlstm_distill::tfla_forward", mutates_args=())
def _forward(
    q: torch.Tensor,  # (B, NH, S, DHQK), already multiplied by DHQK^0.5
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S) float32
    f: torch.Tensor,  # (B, NH, S) float32 forget gate pre-activations
    c0: Optional[torch.Tensor],  # (B, NH, DHQK, DHV)
    n0: Optional[torch.Tensor],  # (B, NH, DHQK)
    m0: Optional[torch.Tensor],  # (B, NH, 1)
    chunk: int,
    keep_states: bool,
    params: str,  # the Triton kernel's launch settings, JSON
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """h (B, NH, S, DHV) in q's dtype; the per-token n and m that the backward reads (B, NH, S); the last C, n, m
    (float32, m as (B, NH, 1)); the chunk states for the backward (float32; empty unless ``keep_states``)."""
    q, k, v, i, f = (x.contiguous() for x in (q, k, v, i, f))
    common = dict(matC_initial=c0, vecN_initial=n0, scaM_initial=m0, qk_scale=q.shape[-1] ** -0.5,
                  return_last_states=True, chunk_size=chunk, eps=mlstm.EPS)
    if q.is_cuda:
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk.fw import mlstm_chunkwise_fw

        with _same_dispatch_keys():
            h, n_out, m_out, last, kept = mlstm_chunkwise_fw(q, k, v, i, f, **common, return_all_states=keep_states,
                                                             output_dtype=q.dtype, **json.loads(params))
    else:
        from mlstm_kernels.torch.chunkwise.native.fw import mlstm_chunkwise_fw

        h, n_out, m_out, last, kept = mlstm_chunkwise_fw(q, k, v, i, f, **common)
        n_out, m_out = n_out.float(), m_out.float()
    kept = kept or tuple(q.new_empty(0, dtype=torch.float32) for _ in range(3))  # outputs may not alias
    return (h.to(q.dtype).contiguous(), n_out.contiguous(), m_out.contiguous(),  # the fake's strides
            *(x.float().contiguous() for x in last), *kept)


@_forward.register_fake
def _(q, k, v, i, f, c0, n0, m0, chunk, keep_states, params):
    B, NH, S, DHQK = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    per_token = q.new_empty(B, NH, S, dtype=q.dtype if q.is_cuda else torch.float32)
    if keep_states:  # mlstm_kernels' rule: a state after each inter-chunk, saved every n-th one, and the initial one
        from mlstm_kernels.triton.chunkwise.kernel_param_heuristics import get_xl_chunk_kernel_params

        launch = json.loads(params)
        sizes = {key: launch[key] for key in ("chunk_size_inter", "chunk_size_intra", "siz_b_L_parallel",
                                              "siz_b_L_loop") if key in launch}
        params = get_xl_chunk_kernel_params(sequence_length=S, target_chunk_size=chunk, **sizes)
        saved = S // params.chunk_size_inter // params.save_states_every_nth_chunk + 1
        kept = (q.new_empty(B, NH, saved * DHQK, v.shape[-1], **f32), q.new_empty(B, NH, saved * DHQK, **f32),
                q.new_empty(B, NH, saved, **f32))
    else:
        kept = tuple(q.new_empty(0, **f32) for _ in range(3))
    return (q.new_empty(B, NH, S, v.shape[-1]), per_token, per_token.clone(), q.new_empty(B, NH, DHQK, v.shape[-1], **f32),
            q.new_empty(B, NH, DHQK, **f32), q.new_empty(B, NH, 1, **f32), *kept)


@torch.library.custom_op("xlstm_distill::tfla_backward", mutates_args=())
def _backward(
    dh: torch.Tensor,  # (B, NH, S, DHV)
    dC: torch.Tensor,  # (B, NH, DHQK, DHV) gradient of the last C
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
    c0: Optional[torch.Tensor], n0: Optional[torch.Tensor], m0: Optional[torch.Tensor],
    C_all: torch.Tensor, n_all: torch.Tensor, m_all: torch.Tensor,  # the forward's chunk states (empty: recompute)
    n_out: torch.Tensor, m_out: torch.Tensor,  # (B, NH, S)
    chunk: int,
    params: str,  # the Triton kernel's launch settings, JSON
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Gradients of q, k, v, i, f (their dtypes) and of the initial C, n, m (empty without an initial state)."""
    kept = (C_all, n_all, m_all) if C_all.numel() else (None, None, None)
    dh = dh.contiguous()
    scale = q.shape[-1] ** -0.5
    if q.is_cuda:
        from mlstm_kernels.torch.chunkwise.triton_xl_chunk.bw import mlstm_chunkwise_bw

        with _same_dispatch_keys():
            grads = mlstm_chunkwise_bw(q, k, v, i, f, c0, n0, m0, *kept, vecN_out=n_out, vecM_out=m_out,
                                       matDeltaH_out=dh, matDeltaC_last=dC, qk_scale=scale, chunk_size=chunk,
                                       eps=mlstm.EPS, **json.loads(params))
    else:
        from mlstm_kernels.torch.chunkwise.native.bw import mlstm_chunkwise_bw

        grads = mlstm_chunkwise_bw(q, k, v, i, f, c0, n0, m0, *kept, vecN_out=n_out, vecM_out=m_out, matDeltaH=dh,
                                   matDeltaC_last=dC, qk_scale=scale, CHUNK_SIZE=chunk, EPS=mlstm.EPS)
    inputs = (q, k, v, i, f, c0, n0, m0)
    return tuple(q.new_empty(0) if x is None or g is None else g.to(x.dtype).reshape(x.shape).contiguous()
                 for g, x in zip(grads, inputs))


@_backward.register_fake
def _(dh, dC, q, k, v, i, f, c0, n0, m0, C_all, n_all, m_all, n_out, m_out, chunk, params):
    return tuple(q.new_empty(0) if x is None else x.new_empty(x.shape) for x in (q, k, v, i, f, c0, n0, m0))


def _setup_backward(ctx, inputs, output) -> None:
    q, k, v, i, f, c0, n0, m0, chunk, _, params = inputs
    _, n_out, m_out, C, _, _, C_all, n_all, m_all = output
    ctx.save_for_backward(q, k, v, i, f, c0, n0, m0, C_all, n_all, m_all, n_out, m_out, C)
    ctx.chunk, ctx.params = chunk, params


def _differentiate(ctx, dh, _n_out, _m_out, dC, *_):
    *saved, C = ctx.saved_tensors
    dC = torch.zeros_like(C) if dC is None else dC
    grads = torch.ops.xlstm_distill.tfla_backward(dh, dC, *saved, ctx.chunk, ctx.params)
    has_state = saved[5] is not None
    return (*grads[:5], *(grads[5:] if has_state else (None,) * 3), None, None, None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("The TFLA kernel's backward is first-order only (mlstm_kernels has no second derivative).")


_forward.register_autograd(_differentiate, setup_context=_setup_backward)
_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# The registered implementation (xlstm_distill.kernels.ops has the signature).
@register_kernel("mlstm", "tfla")
def _tfla(q, k, v, i, f, state, reset, chunk_size: int, options: KernelOptions):
    h, state = mlstm_tfla(q, k, v, i, f, state, chunk_size, reset, options)
    return h.to(v.dtype), state
