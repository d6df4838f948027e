"""FP8 (e4m3) linear layers for the Wan DiT's blocks, with the activation quantisation fused upstream.

`Fp8Linear` holds its weight quantised once, when the layer is converted (after the weights load and any LoRA
merge): e4m3 [N, K] with one float32 scale per output channel ([1, N]: amax of the channel's K weights / 448). Its
input is either an `Fp8Act` -- e4m3 rows and their scales, made by the fused kernel that produced the activation
(kernels/fp8_act_quant.py: LayerNorm + adaLN modulation, bias + GELU) -- or a plain tensor, quantised per row here
(the attention outputs before the o projections: one small pass over [L, dim]). The product is
`torch._scaled_mm(a8 [M, K], w8.t() [K, N], scale_a [M, 1], scale_b [1, N], bias, out_dtype=bf16)`: row-wise
scaling, float32 accumulation, the bias in the epilogue where the backend takes it (probed once per device; else
added after). cuBLASLt wants a row-major A and a column-major B: w8 is stored [N, K] contiguous, so w8.t() is.

Off CUDA (tests, the CPU) the product is the torch reference: the dequantised operands multiplied in float32
(`fp8_linear_reference`), the same e4m3 values and scales, so a CPU model in FP8 shows FP8's error.

Under torch.compile the kernels are opaque custom ops (`reactor_graph::fp8_norm_quant`, `::fp8_act_quant`) with
fake implementations, so Dynamo traces through them (the regional compile of the DiT's `WanBlock.qkv` / `finish`)
and the CUDA graph captures the launches. Weights are parameters (requires_grad False): warm-up copies of the node
share them (reactor_graph/tiers.py shares parameters, not buffers).
"""
from typing import NamedTuple

import torch
from torch import nn


__all__ = ["Fp8Act", "Fp8Linear", "FP8_LINEARS", "fp8_matmul_unavailable", "quantize_weight", "fp8_linear_reference",
           "convert_linears_", "restore_linears_", "norm_quant_op", "act_quant_op"]

FP8 = torch.float8_e4m3fn
# the block linears that run in FP8 (the cross-attention k/v see the 512 text tokens once per prompt: bf16)
FP8_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
               "ffn.0", "ffn.2")


class Fp8Act(NamedTuple):
    """An activation quantised per row: data e4m3 [..., K], scale float32 [..., 1] (data * scale ~= the values)."""

    data: torch.Tensor
    scale: torch.Tensor


# ------------------------------------------------------------------------------------------ custom ops


def _kernels():
    """kernels/fp8_act_quant.py, imported on first use (it imports triton: the bf16 model's start does not)."""
    from reactor_graph.kernels import fp8_act_quant

    return fp8_act_quant


@torch.library.custom_op("reactor_graph::fp8_norm_quant", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor? scale, int frames, "
                                "float eps) -> (Tensor, Tensor)")
def norm_quant_op(x, weight, bias, shift, scale, frames, eps):
    return _kernels().norm_quant(x, weight, bias, shift, scale, frames, eps)


@norm_quant_op.register_fake
def _(x, weight, bias, shift, scale, frames, eps):
    return x.new_empty(x.shape, dtype=FP8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("reactor_graph::fp8_act_quant", mutates_args=(),
                         schema="(Tensor y, Tensor? bias, bool gelu) -> (Tensor, Tensor)")
def act_quant_op(y, bias, gelu):
    return _kernels().act_quant(y, bias, gelu)


@act_quant_op.register_fake
def _(y, bias, gelu):
    return y.new_empty(y.shape, dtype=FP8), y.new_empty((*y.shape[:-1], 1), dtype=torch.float32)


def modulate_quant(x, shift, scale, frames: int, eps: float) -> Fp8Act:
    return Fp8Act(*norm_quant_op(x, None, None, shift, scale, frames, eps))


def layernorm_quant(x, weight, bias, eps: float) -> Fp8Act:
    return Fp8Act(*norm_quant_op(x, weight, bias, None, None, 1, eps))


def gelu_quant(y, bias=None) -> Fp8Act:
    return Fp8Act(*act_quant_op(y, bias, True))


def quantize_rows(x) -> Fp8Act:
    return Fp8Act(*act_quant_op(x, None, False))


# ------------------------------------------------------------------------------------------ the layer


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (e4m3 [N, K] contiguous, float32 scale [1, N] contiguous), one scale per output channel."""
    q, s = _kernels().quantize_rows_reference(w.detach())
    return q.contiguous(), s.reshape(1, -1).contiguous()


def fp8_linear_reference(a8, a_scale, w8, w_scale, bias, out_dtype):
    """What the FP8 product computes, in torch on any device: (a8 * a_scale) @ (w8 * w_scale).T + bias in
    float32, rounded to out_dtype. a8 [M, K], a_scale [M, 1], w8 [N, K], w_scale [1, N]."""
    y = (a8.float() @ w8.float().t()) * a_scale * w_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_matmul_unavailable(device: torch.device | str) -> str | None:
    """Why the FP8 matmul cannot run on `device` (None when it can; off CUDA the torch reference runs)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"FP8 matmuls (torch._scaled_mm) need sm89 or newer; this GPU is sm{major}{minor}"
    return None


_BIAS_IN_EPILOGUE: dict[str, bool] = {}


def _scaled_mm_takes_bias(device: torch.device) -> bool:
    """Whether this torch's row-wise `_scaled_mm` takes a bf16 bias on `device` (cuBLASLt's or CUTLASS's path;
    asked once per device, outside any trace)."""
    key = str(device)
    if key not in _BIAS_IN_EPILOGUE:
        a = torch.ones(16, 32, device=device).to(FP8)
        w = torch.ones(32, 32, device=device).to(FP8)
        sa, sw = torch.ones(16, 1, device=device), torch.ones(1, 32, device=device)
        bias = torch.full((32,), 2.0, device=device, dtype=torch.bfloat16)
        try:
            y = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw, bias=bias, out_dtype=torch.bfloat16)
            ok = bool((y.float() == 34.0).all())
        except (RuntimeError, NotImplementedError, ValueError):
            ok = False
        _BIAS_IN_EPILOGUE[key] = ok
    return _BIAS_IN_EPILOGUE[key]


class Fp8Linear(nn.Module):
    """A linear layer on e4m3 weights with per-output-channel scales; input an `Fp8Act` or a tensor."""

    def __init__(self, weight8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False):
        super().__init__()
        n, k = weight8.shape
        if weight8.dtype != FP8 or weight_scale.shape != (1, n):
            raise ValueError(f"Fp8Linear wants e4m3 [N, K] weights and [1, N] scales, got {weight8.dtype} "
                             f"{list(weight8.shape)} and {list(weight_scale.shape)}")
        self.in_features, self.out_features = k, n
        self.out_dtype = out_dtype
        # Hopper's FP8 MMA accumulates in reduced precision unless the sum is promoted to float32 now and then;
        # fast_accum skips the promotion (faster, less exact over K = 8960): off unless measured to pay
        self.fast_accum = fast_accum
        self.weight8 = nn.Parameter(weight8, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale.float(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)
        dev = weight8.device
        self.bias_in_mm = dev.type == "cuda" and bias is not None and _scaled_mm_takes_bias(dev)

    @classmethod
    def from_linear(cls, layer: nn.Linear, out_dtype: torch.dtype | None = None) -> "Fp8Linear":
        why = fp8_matmul_unavailable(layer.weight.device)
        if why is not None:
            raise ValueError(f"linears: fp8: {why}")
        w8, ws = quantize_weight(layer.weight)
        dtype = out_dtype or (layer.weight.dtype if layer.weight.dtype in (torch.bfloat16, torch.float16)
                              else torch.bfloat16)
        return cls(w8, ws, layer.bias, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, bias={self.bias is not None}"

    def forward(self, x, bias: bool = True) -> torch.Tensor:
        """x: Fp8Act or a tensor [..., K] -> [..., N] in out_dtype. bias=False leaves the bias out (the FFN's
        first layer adds it in the GELU kernel)."""
        act = x if isinstance(x, Fp8Act) else quantize_rows(x)
        lead = act.data.shape[:-1]
        a8 = act.data.reshape(-1, self.in_features)
        sa = act.scale.reshape(-1, 1)
        b = self.bias if bias else None
        if a8.is_cuda:
            in_mm = b is not None and self.bias_in_mm
            y = torch._scaled_mm(a8, self.weight8.t(), scale_a=sa, scale_b=self.weight_scale,
                                 bias=b if in_mm else None, out_dtype=self.out_dtype,
                                 use_fast_accum=self.fast_accum)
            if b is not None and not in_mm:
                y = y + b
        else:
            y = fp8_linear_reference(a8, sa, self.weight8, self.weight_scale, b, self.out_dtype)
        return y.view(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by (float32 [N, K]): for checks."""
        return self.weight8.float() * self.weight_scale.t()


# ------------------------------------------------------------------------------------------ conversion


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part) if not part.isdigit() else root[int(part)]
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = _get(root, parent) if parent else root
    if leaf.isdigit():
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


@torch.no_grad()
def convert_linears_(model: nn.Module, keep: bool = False) -> dict[str, nn.Linear]:
    """Replace the FP8_LINEARS of every block of a WanDiT by `Fp8Linear`s (in place). keep: return the replaced
    bf16 layers (name -> module) so `restore_linears_` can put them back (a bench comparing both in one process);
    else they are dropped and their memory freed. Layers already in FP8 are left as they are."""
    kept = {}
    for i, blk in enumerate(model.blocks):
        for path in FP8_LINEARS:
            layer = _get(blk, path)
            if isinstance(layer, Fp8Linear):
                continue
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"blocks.{i}.{path} is a {type(layer).__name__}, not a Linear")
            _set(blk, path, Fp8Linear.from_linear(layer))
            if keep:
                kept[f"blocks.{i}.{path}"] = layer
    return kept


def restore_linears_(model: nn.Module, kept: dict[str, nn.Linear]) -> None:
    """Put the bf16 layers `convert_linears_(keep=True)` returned back in place."""
    for name, layer in kept.items():
        _set(model, name, layer)
