"""Parameter sets to benchmark: the tensor shapes of real models, without allocating them.

The model configurations are the published ones (``config.json`` on the Hugging Face Hub), written
here so that nothing is downloaded. Key names follow ``transformers`` except ``qkv_bias`` (Qwen2 has
biases on the q/k/v projections only; Llama's ``attention_bias`` would also add one to o_proj).
"""
from __future__ import annotations

import math

# Qwen/Qwen2.5-1.5B (and -Instruct): 28 layers, grouped-query attention, tied embeddings.
QWEN2_5_1_5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "qkv_bias": True,
}
QWEN2_5_1_5B_TENSORS = 338
QWEN2_5_1_5B_NUMEL = 1_543_714_304

# HuggingFaceTB/SmolLM2-135M (Llama architecture, no biases).
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "qkv_bias": False,
}

# The Qwen2 architecture shrunk so that CPU smoke runs take seconds.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
    "tie_word_embeddings": True,
    "qkv_bias": True,
}

MANY_SMALL_TENSORS = 4096
MANY_SMALL_NUMEL = 4096


def decoder_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter of a Llama/Qwen2 causal LM, in ``named_parameters`` order."""
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_out = config["num_attention_heads"] * head_dim
    kv_out = config["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for proj, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            shapes.append((f"{prefix}self_attn.{proj}.weight", (out, hidden)))
            if config["qkv_bias"]:
                shapes.append((f"{prefix}self_attn.{proj}.bias", (out,)))
        shapes += [
            (f"{prefix}self_attn.o_proj.weight", (hidden, q_out)),
            (f"{prefix}mlp.gate_proj.weight", (inter, hidden)),
            (f"{prefix}mlp.up_proj.weight", (inter, hidden)),
            (f"{prefix}mlp.down_proj.weight", (hidden, inter)),
            (f"{prefix}input_layernorm.weight", (hidden,)),
            (f"{prefix}post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (config["vocab_size"], hidden)))
    return shapes


def total_numel(shapes) -> int:
    return sum(math.prod(shape) for _, shape in shapes)


def qwen2_5_1_5b_shapes():
    shapes = decoder_shapes(QWEN2_5_1_5B)
    # The numbers; a wrong table would silently benchmark the wrong model.
    assert len(shapes) == QWEN2_5_1_5B_TENSORS, len(shapes)
    assert total_numel(shapes) == QWEN2_5_1_5B_NUMEL, total_numel(shapes)
    return shapes


PARAM_SETS = {
    "qwen2.5-1.5b": qwen2_5_1_5b_shapes,
    "smollm2-135m": lambda: decoder_shapes(SMOLLM2_135M),
    "many-small": lambda: [(f"tensor.{i}", (MANY_SMALL_NUMEL,)) for i in range(MANY_SMALL_TENSORS)],
    "tiny": lambda: decoder_shapes(TINY),
}


def param_shapes(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """The shape table of parameter set ``name`` (one of :data:`PARAM_SETS`)."""
    if name not in PARAM_SETS:
        raise ValueError(f"unknown parameter set {name!r}; choose from {sorted(PARAM_SETS)}")
    return PARAM_SETS[name]()


def flat_shapes(shapes) -> list[tuple[str, tuple[int, ...]]]:
    """One tensor holding as many elements as all of ``shapes``: the launch-overhead-free case."""
    return [("flat", (total_numel(shapes),))]
