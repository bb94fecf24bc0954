"""Benchmark workloads: the tensor shapes of real models, filled with gradient-scaled random values."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch

GRADIENT_SCALE = 1e-3
ALIGNMENT = 64  # bytes: each tensor of a workload starts on a cache line (16-byte GPU loads stay aligned)


@dataclass(frozen=True)
class Workload:
    """Tensor shapes of one dtype; ``tensors`` fills them with randn * 1e-3."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def num_bytes(self) -> int:
        """Bytes of one list of these tensors (Σ numel × itemsize)."""
        return self.numel * self.dtype.itemsize

    def tensors(self, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
        """The shapes as views into one flat buffer filled with randn * 1e-3, each starting on a 64-byte
        boundary (as a DDP gradient bucket or an FSDP flat parameter lays them out), so that the read floor
        reads the very pages the candidates read (:func:`storage_of`)."""
        step = ALIGNMENT // self.dtype.itemsize
        sizes = [math.prod(shape) for shape in self.shapes]
        starts = [0, *itertools.accumulate(-(-size // step) * step for size in sizes)]
        torch.manual_seed(seed)
        flat = torch.randn(starts[-1], dtype=self.dtype, device=device).mul_(GRADIENT_SCALE)
        return [flat[start:start + size].view(shape)
                for start, size, shape in zip(starts, sizes, self.shapes)]


def storage_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 1-D tensor over the whole buffer that the views of :meth:`Workload.tensors` share."""
    first = tensors[0]
    return torch.empty(0, dtype=first.dtype, device=first.device).set_(first.untyped_storage())


def gpt2_small_shapes() -> tuple[tuple[int, ...], ...]:
    """The 148 parameter shapes of GPT-2 small (124,439,808 elements; lm_head is tied to wte)."""
    d, vocab, positions = 768, 50257, 1024
    attention = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1 w/b, c_attn w/b, c_proj w/b
    mlp = [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2 w/b, c_fc w/b, c_proj w/b
    block = attention + mlp
    return ((vocab, d), (positions, d), *block * 12, (d,), (d,))


def llama_shapes(dim: int, layers: int, vocab: int = 32000) -> tuple[tuple[int, ...], ...]:
    """Llama-like shapes: embedding, per layer q/k/v/o (d×d), gate/up/down (d×ffn, ffn = 8d/3 rounded up to a
    multiple of 256) and two norms, then the final norm and the untied output head."""
    ffn = 256 * -(-8 * dim // 3 // 256)
    layer = [(dim, dim)] * 4 + [(ffn, dim), (ffn, dim), (dim, ffn), (dim,), (dim,)]
    return ((vocab, dim), *layer * layers, (dim,), (vocab, dim))


def many_small_shapes(count: int = 5000, low: int = 100, high: int = 5000) -> tuple[tuple[int, ...], ...]:
    """``count`` 1-D tensors of ``low``..``high`` elements (a fixed draw): per-tensor overhead dominates."""
    sizes = random.Random(0)
    return tuple((sizes.randint(low, high),) for _ in range(count))


def moe_shapes(experts: int, dim: int, ffn: int, layers: int) -> tuple[tuple[int, ...], ...]:
    """Mixture-of-experts layers with stacked experts (torchtitan / grouped-GEMM layout): per layer a router
    (experts×dim), w1 and w3 (experts×ffn×dim), w2 (experts×dim×ffn) and a norm (dim)."""
    layer = [(experts, dim), (experts, ffn, dim), (experts, dim, ffn), (experts, ffn, dim), (dim,)]
    return tuple(layer * layers)


WORKLOADS: dict[str, Workload] = {
    "gpt2-small": Workload("gpt2-small", gpt2_small_shapes()),
    "1b": Workload("1b", llama_shapes(2048, 18), torch.bfloat16),
    "7b": Workload("7b", llama_shapes(4096, 32), torch.bfloat16),
    "many-small": Workload("many-small", many_small_shapes()),
    "tiny": Workload("tiny", ((8, 16), (33,), (4, 4, 4), (100,))),  # for tests and smoke runs
    # 64 experts of DeepSeek-MoE-16B's shape (dim 2048, expert ffn 1408), 2 layers; and a CPU-sized version
    "moe-64": Workload("moe-64", moe_shapes(64, 2048, 1408, 2), torch.bfloat16),
    "moe-64-small": Workload("moe-64-small", moe_shapes(64, 128, 96, 2)),
    # parameter lists for the optim family's memory criterion: 1.007 GB and 67 MB of float32
    "params-1gb": Workload("params-1gb", ((4096, 4096),) * 15),
    "params-64mb": Workload("params-64mb", ((2048, 2048),) * 4),
}
DEFAULT_WORKLOADS = {"cpu": ("gpt2-small",), "cuda": ("gpt2-small", "1b", "7b", "many-small")}
