"""Skinny GEMM for small-batch decode: out[M, N] = x[M, K] @ w[N, K]^T for M in 1..16.

At these M the matmul is a stream over the weight, so the kernel is built for bandwidth:

- each program owns BLOCK_N weight rows and one K slice, loads BLOCK_K contiguous elements per row
  (wide vector loads) and accumulates in fp32;
- for M <= 4 (FMA path) the accumulator is 3-D, [BLOCK_M, BLOCK_N, BLOCK_K]: the loop only
  multiplies and adds element-wise, and the K reduction (warp shuffles, barriers) happens once,
  after the loop. A `tl.sum` per K step, as before, put 6 barriers and 40 shuffles in every 16 KB
  step at M = 1 (24 and 160 at M = 4) and kept the compiler from pipelining the loads;
- the K loop is a `tl.range` with NUM_STAGES stages, which tells Triton to software-pipeline the
  weight loads through asynchronous copies (cp.async into shared memory) even without a tl.dot;
- for M > 4 the product goes through tl.dot (M padded to 16; Triton pipelines it the same way);
- split-K (when N alone leaves SMs idle) reduces inside the same launch: each program stores its
  fp32 partial, takes a ticket from a per-column-block counter, and the last program of a column
  block sums every partial in split order (deterministic, whichever program is last), writes the
  output and resets the counter to 0 for the next launch. No second kernel, so a split linear is
  one launch in a CUDA graph;
- gated (the MLP's down projection): x is the gate/up output [M, 2K] and the kernel applies
  silu(gate) * up as it loads it, so SiLU-and-mul is no kernel of its own;
- normed (QKV and gate/up after a pre-norm): x is the layer's input before RMSNorm and the kernel
  applies the norm as it loads it, so RMSNorm (+ the residual add) is no kernel of its own. Every
  program first sums the squares of its M rows over the whole K (x + residual, at most 16 rows of
  K elements: read from L2, small beside the weight), then normalizes each loaded x tile with that
  rms and the norm weight, rounding as worker/kernels/rmsnorm.py does. Exactly one program (column
  block 0, K slice 0) stores x + residual, the next layer's residual, into a fresh buffer, so no
  program reads a residual another one is overwriting.

`linear_choice.pick_linear_impl` decides, per shape and batch size, whether this beats cuBLAS.

With `w_scale` (one float32 scale per weight row) it is a weight-only FP8 matvec: e4m3 rows are
converted as they load, and each output column is scaled once after the loop
(worker/kernels/fp8_linear_choice.py picks it or the W8A8 `_scaled_mm` path per shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardline.worker.kernels.activation import silu_and_mul_reference
from shardline.worker.kernels.rmsnorm import rms_norm_reference
from shardline.worker.kernels.runtime import cdiv, interpreted_bf16_dot, kernel, next_pow2, tl, use_triton

MAX_M = 16
FMA_MAX_M = 4  # above this the tile goes through tl.dot (M padded to 16)
_NORM_TILE = 8192  # elements of x one step of the normed matvec's rms pre-pass loads (16 registers a thread at 4 warps)
TICKET_COUNTERS = 1 << 16  # split-K tickets: one int32 per column block of one launch


@dataclass(frozen=True)
class MatvecConfig:
    """Tile sizes, K split and pipeline depth of one matvec launch.

    block_n, block_k: weight rows and columns one program loads per K step (powers of two);
    split_k: programs per column block, each over one K slice (1 = no split);
    num_warps: warps per program; num_stages: K steps in flight (cp.async pipeline depth).
    """

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class PreNorm:
    """An RMSNorm to apply to the matvec's input as it loads (see the module note).

    weight: [K] the norm's scale, in the activation dtype; eps: added to the mean square;
    residual: [M, K] added to x first (the sum is returned as the next residual), or None.
    """

    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None


@kernel(do_not_specialize=("M",))  # the batch size: 1..16 from step to step
def _matvec_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    part_ptr,
    ticket_ptr,
    w_scale_ptr,
    res_ptr,
    res_out_ptr,
    norm_w_ptr,
    eps,
    M,
    N,
    K,
    k_per_split,
    num_splits,
    stride_xm,
    stride_wn,
    stride_om,
    stride_ps,
    stride_pm,
    stride_rm,
    stride_rom,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
    EVEN_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    GATED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM_BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # Padding rows (m >= M) re-read the last row rather than masking: the final store drops them.
    x_rows = x_ptr + tl.minimum(offs_m, M - 1)[:, None] * stride_xm
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    if NORM:  # the rms of each row of x (+ residual) over the whole K, before the weight stream
        r_rows = res_ptr + tl.minimum(offs_m, M - 1)[:, None] * stride_rm
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        writer = (pid_n == 0) & (pid_k == 0)
        for k0 in range(0, K, NORM_BLOCK_K):  # few wide steps: latency, not bandwidth, bounds this
            offs_k = k0 + tl.arange(0, NORM_BLOCK_K)
            k_ok = offs_k < K
            h = tl.load(x_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            if HAS_RESIDUAL:  # rounded to the activation dtype, as the unfused `x + residual` is
                h = (h.to(tl.float32) + tl.load(r_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)).to(h.dtype)
                if writer:
                    tl.store(res_out_ptr + offs_m[:, None] * stride_rom + offs_k[None, :], h, mask=m_ok[:, None] & k_ok[None, :])
            hf = h.to(tl.float32)
            sum_sq += tl.sum(hf * hf, 1)
        inv_rms = 1.0 / tl.sqrt(sum_sq / K + eps)
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = tl.max_contiguous(tl.multiple_of(k0 + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        if EVEN_K:
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None], other=0.0)
            x = tl.load(x_rows + offs_k[None, :])
            if GATED:  # x holds [gate | up], K columns each: the activation is silu(gate) * up
                up = tl.load(x_rows + K + offs_k[None, :])
        else:
            k_ok = offs_k < k_hi
            w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)
            if GATED:
                up = tl.load(x_rows + K + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        if GATED:  # rounded to the input dtype, as activation.silu_and_mul's output would be
            g = x.to(tl.float32)
            x = (g * tl.sigmoid(g) * up.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if NORM:  # rmsnorm.py's roundings: the sum, the normalized row, the scaled output
            if HAS_RESIDUAL:
                if EVEN_K:
                    r = tl.load(r_rows + offs_k[None, :])
                else:
                    r = tl.load(r_rows + offs_k[None, :], mask=k_ok[None, :], other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            if EVEN_K:
                gamma = tl.load(norm_w_ptr + offs_k).to(tl.float32)
            else:
                gamma = tl.load(norm_w_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            normed = (x.to(tl.float32) * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            x = (normed * gamma[None, :]).to(x_ptr.dtype.element_ty)
        if USE_DOT:
            if UPCAST_DOT:
                x = x.to(tl.float32)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
        else:
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, 2)  # the one K reduction, after the loop
    if HAS_SCALE:  # per-row weight scales: linear, so split-K partials may be scaled apart
        acc = acc * tl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        part_tile = offs_m[:, None] * stride_pm + offs_n[None, :]
        tl.store(part_ptr + pid_k * stride_ps + part_tile, acc, mask=mask)
        # Every thread's partial is stored before the one release below (CTA barrier, then a
        # gpu-scope acq_rel ticket): the program that draws the last ticket sees all partials.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == num_splits - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, num_splits):  # split order, whichever program came last: deterministic
                total += tl.load(part_ptr + s * stride_ps + part_tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(ticket_ptr + pid_n, 0)  # ready for the next launch (and the next graph replay)
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


_TICKETS_BY_DEVICE: dict[torch.device, torch.Tensor] = {}


def split_tickets(device: torch.device) -> torch.Tensor:
    """The split-K ticket counters of `device` (the matvec's and paged attention's): zeroed once,
    left zeroed by every launch.

    NOTE: shared by every split launch on the device, which is safe because launches on one stream
    run in order; the first call must come outside CUDA-graph capture (the engine's warm-up does),
    or the zeroing would be captured into the graph's pool.
    """
    t = _TICKETS_BY_DEVICE.get(device)
    if t is None:
        t = _TICKETS_BY_DEVICE[device] = torch.zeros(TICKET_COUNTERS, dtype=torch.int32, device=device)
    return t


def matvec_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T through torch (cuBLAS on CUDA)."""
    return F.linear(x, w)


def default_config(M: int, N: int, K: int, num_sms: int = 132) -> MatvecConfig:
    """A shape-only guess: 16-row tiles for FMA (M <= 4; BLOCK_K shrinking with M to bound the 3-D
    accumulator's registers at 32 fp32 per thread per row), 64-row tiles for tl.dot; split K only
    while the grid has fewer programs than SMs (at Llama-3-8B shapes, M = 1: never; a
    tensor-parallel shard's narrower N: yes). All programs of a 1-2 program-per-SM grid are
    resident at once, so there is no tail wave to split away."""
    if M <= FMA_MAX_M:
        block_n, block_k = 16, {1: 256, 2: 256, 3: 128, 4: 128}[M]
    else:
        block_n, block_k = 64, 128
    block_k = min(block_k, max(16, next_pow2(K)))
    programs = cdiv(N, block_n)
    split = 1
    while programs * split < num_sms and K // (split * 2) >= 4 * block_k:
        split *= 2
    return MatvecConfig(block_n=block_n, block_k=block_k, split_k=split)


def matvec(
    x: torch.Tensor, w: torch.Tensor, config: MatvecConfig | None = None, impl: str = "auto", gated: bool = False,
    w_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, N] = x[M, K] @ w[N, K]^T with the skinny-GEMM kernel: one launch, split or not.

    gated: x is [M, 2K], a gate/up projection's output (gate first), and the product is
    silu(gate) * up @ w.T: the gated MLP's activation computed as the down projection loads its
    input, so SiLU-and-mul is no kernel of its own. With w_scale [N] (float32), w's rows are scaled
    by it: the weight is w * w_scale[:, None] (weight-only FP8: w in e4m3). M <= 16 (larger M, M = 0 and the torch path use
    torch). Raises ValueError when the shapes do not match or a split config would need more than
    65536 column blocks.
    """
    k_in = 2 * w.shape[-1] if gated else w.shape[-1]
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != k_in:
        need = "[M, 2K]" if gated else "[M, K]"
        raise ValueError(f"matvec: need x {need} and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    M = x.shape[0]
    N, K = w.shape
    if w_scale is not None and w_scale.numel() != N:
        raise ValueError(f"matvec: w_scale has {w_scale.numel()} values for {N} weight rows")
    if M > MAX_M or M == 0 or not use_triton(x, impl):
        if w_scale is not None:
            w = (w.float() * w_scale.reshape(-1, 1).float()).to(x.dtype)
        return matvec_reference(silu_and_mul_reference(x) if gated else x, w)
    return _launch(x, w, config, gated, w_scale, None, None)


def normed_matvec(
    x: torch.Tensor, w: torch.Tensor, norm: PreNorm, config: MatvecConfig | None = None, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * norm.weight @ w.T, x + residual) in one launch: the pre-norm of QKV
    or gate/up applied as the matvec loads x [M, K] (without a residual the second output is x).
    Equal to rmsnorm.rms_norm then matvec up to fp32 summation order. M <= 16 (else, and on the
    torch path, those two calls). Raises ValueError on mismatched shapes."""
    M, K = x.shape if x.dim() == 2 else (0, -1)
    if w.dim() != 2 or w.shape[1] != K or norm.weight.numel() != K or (
            norm.residual is not None and tuple(norm.residual.shape) != tuple(x.shape)):
        got = (tuple(x.shape), tuple(w.shape), tuple(norm.weight.shape), None if norm.residual is None else tuple(norm.residual.shape))
        raise ValueError(f"normed_matvec: need x [M, K], w [N, K], norm weight [K], residual [M, K]; got {got}")
    if M > MAX_M or M == 0 or not use_triton(x, impl):
        h, summed = rms_norm_reference(x, norm.weight, norm.eps, norm.residual)
        return matvec_reference(h, w), summed
    if x.stride(-1) != 1:
        x = x.contiguous()
    residual = norm.residual
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    res_out = torch.empty_like(x) if residual is not None else x
    return _launch(x, w, config, False, None, PreNorm(norm.weight, norm.eps, residual), res_out), res_out


def _launch(x: torch.Tensor, w: torch.Tensor, config: MatvecConfig | None, gated: bool,
            w_scale: torch.Tensor | None, norm: PreNorm | None, res_out: torch.Tensor | None) -> torch.Tensor:
    """One _matvec_kernel launch (the caller has checked the shapes and chosen Triton)."""
    M = x.shape[0]
    N, K = w.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    cfg = config or default_config(M, N, K)
    use_dot = M > FMA_MAX_M
    block_m = max(16, next_pow2(M)) if use_dot else next_pow2(M)
    k_per_split = cdiv(cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k
    split = cdiv(K, k_per_split)
    even_k = K % cfg.block_k == 0
    grid_n = cdiv(N, cfg.block_n)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    upcast = interpreted_bf16_dot(x.dtype)
    if split > 1:
        if grid_n > TICKET_COUNTERS:
            raise ValueError(f"matvec: split-K over {grid_n} column blocks, more than {TICKET_COUNTERS}")
        part = torch.empty(split, M, N, dtype=torch.float32, device=x.device)
        tickets = split_tickets(x.device)
    else:
        part, tickets = out, out
    _matvec_kernel[(grid_n, split)](
        x,
        w,
        out,
        part,
        tickets,
        w_scale if w_scale is not None else out,  # unused without HAS_SCALE
        norm.residual if norm is not None and norm.residual is not None else out,  # unused without them
        res_out if res_out is not None else out,
        norm.weight if norm is not None else out,
        norm.eps if norm is not None else 0.0,
        M,
        N,
        K,
        k_per_split,
        split,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        part.stride(0) if split > 1 else 0,
        part.stride(1) if split > 1 else 0,
        norm.residual.stride(0) if norm is not None and norm.residual is not None else 0,
        res_out.stride(0) if res_out is not None else 0,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        USE_DOT=use_dot,
        SPLIT=split > 1,
        EVEN_K=even_k,
        NUM_STAGES=cfg.num_stages,
        GATED=gated,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32",
        UPCAST_DOT=upcast,
        HAS_SCALE=w_scale is not None,
        NORM=norm is not None,
        HAS_RESIDUAL=norm is not None and norm.residual is not None,
        # the norm's pre-pass loads BLOCK_M x NORM_BLOCK_K elements a step: 8192 (one step at M = 1, K = 4096)
        NORM_BLOCK_K=min(next_pow2(K), max(16, _NORM_TILE // block_m)) if norm is not None else 16,
        num_warps=cfg.num_warps,
    )
    return out
