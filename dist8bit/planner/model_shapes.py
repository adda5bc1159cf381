"""Model shapes: the list of parameter tensors a model trains, from a preset or (layers, width, vocab).

The planner counts optimizer state per tensor, exactly as the optimizer lays it
out (small tensors keep 32-bit state, blocks start at each tensor), so it needs
the real tensors, not only their total. Each tensor carries the module it
belongs to: DeepSpeed's ZeRO-3 estimator gathers the largest *module* at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tensor:
    """One trained parameter: `module` groups a layer's weight and bias."""

    module: str
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShape:
    name: str
    tensors: tuple[Tensor, ...]
    # the module whose optimizer state StableEmbedding keeps 32-bit (None: no stable embedding)
    stable_embedding: str | None = None

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def largest_module_params(self) -> int:
        """Parameters of the largest module (DeepSpeed's `largest_layer_params`)."""
        sizes: dict[str, int] = {}
        for tensor in self.tensors:
            sizes[tensor.module] = sizes.get(tensor.module, 0) + tensor.numel
        return max(sizes.values())

    def with_stable_embedding(self) -> ModelShape:
        return ModelShape(self.name, self.tensors, stable_embedding="token_embedding")


def _linear(module: str, fan_in: int, fan_out: int, bias: bool) -> list[Tensor]:
    weight = [Tensor(module, "weight", (fan_out, fan_in))]
    return weight + ([Tensor(module, "bias", (fan_out,))] if bias else [])


def _norm(module: str, width: int) -> list[Tensor]:
    return [Tensor(module, "weight", (width,)), Tensor(module, "bias", (width,))]


def gpt_shapes(name: str, layers: int, width: int, vocab: int, context: int = 1024, tied: bool = True) -> ModelShape:
    """launch/model.py's GPT (GPT-2 layout): learned positions, fused qkv, 4x MLP, LayerNorms with bias."""
    tensors = [Tensor("token_embedding", "weight", (vocab, width)), Tensor("position_embedding", "weight", (context, width))]
    for layer in range(layers):
        prefix = f"blocks.{layer}."
        # model.parameters() order: ZeRO's flat partitions follow it
        tensors += _norm(prefix + "attn_norm", width)
        tensors += _linear(prefix + "attn.qkv", width, 3 * width, bias=True)
        tensors += _linear(prefix + "attn.proj", width, width, bias=True)
        tensors += _norm(prefix + "mlp_norm", width)
        tensors += _linear(prefix + "mlp.up", width, 4 * width, bias=True)
        tensors += _linear(prefix + "mlp.down", 4 * width, width, bias=True)
    tensors += _norm("final_norm", width)
    if not tied:
        tensors += _linear("head", width, vocab, bias=False)
    return ModelShape(name, tuple(tensors))


def llama_shapes(name: str, layers: int, width: int, vocab: int, ffn: int, heads: int, kv_heads: int) -> ModelShape:
    """Llama: untied embedding and head, RMSNorm gains, grouped-query attention, SwiGLU MLP, no biases."""
    kv_width = width // heads * kv_heads
    tensors = [Tensor("embed_tokens", "weight", (vocab, width))]
    for layer in range(layers):
        prefix = f"layers.{layer}."
        tensors += [Tensor(prefix + "input_layernorm", "weight", (width,))]
        for proj, out in (("q_proj", width), ("k_proj", kv_width), ("v_proj", kv_width), ("o_proj", width)):
            tensors += _linear(prefix + "self_attn." + proj, width, out, bias=False)
        tensors += [Tensor(prefix + "post_attention_layernorm", "weight", (width,))]
        for proj, fan_in, out in (("gate_proj", width, ffn), ("up_proj", width, ffn), ("down_proj", ffn, width)):
            tensors += _linear(prefix + "mlp." + proj, fan_in, out, bias=False)
    tensors += [Tensor("norm", "weight", (width,))]
    tensors += _linear("lm_head", width, vocab, bias=False)
    return ModelShape(name, tuple(tensors))


# The published configurations (GPT-2 small; Llama 2 7B/13B/70B).
PRESETS = {
    "gpt2-124m": lambda: gpt_shapes("gpt2-124m", layers=12, width=768, vocab=50257, context=1024),
    "llama-7b": lambda: llama_shapes("llama-7b", layers=32, width=4096, vocab=32000, ffn=11008, heads=32, kv_heads=32),
    "llama-13b": lambda: llama_shapes("llama-13b", layers=40, width=5120, vocab=32000, ffn=13824, heads=40, kv_heads=40),
    "llama-70b": lambda: llama_shapes("llama-70b", layers=80, width=8192, vocab=32000, ffn=28672, heads=64, kv_heads=8),
}


def preset(name: str) -> ModelShape:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def model_from_params(num_params: int, width: int = 4096) -> ModelShape:
    """A model known only by its size: width x width matrices (the bulk of any transformer)
    and one remainder tensor. Every tensor is far above min_8bit_size, so the state bytes
    per parameter are those of a large transformer's matrices; the largest module is one matrix."""
    if num_params < 1:
        raise ValueError(f"a model needs at least one parameter, got {num_params}")
    full, rest = divmod(int(num_params), width * width)
    tensors = [Tensor(f"matrix.{i}", "weight", (width, width)) for i in range(full)]
    if rest:
        tensors.append(Tensor("remainder", "weight", (rest,)))
    return ModelShape(f"{num_params:.3g} params", tuple(tensors))
