"""FastGPT in Transformers v5's decoder anatomy: norm, rotary, MLP, hybrid attention, decoder layer, models.

The skeleton and parameter names are Llama's (DESIGN.md section 1); attention follows `config.layer_types`
(section 2). Windowed attention goes through one backend chosen by `config._attn_implementation` from
`WINDOWED_ATTENTION_FUNCTIONS`; the dynamic layer's global branch lives in `attention_compressed`, the selective
layer's (README, "The selective layer") in `attention_selective`.

Inputs: `attention_mask` is 2D, `[B, past + T]`, 1 for real tokens and 0 for padding (left padding for batched
generation). Without `position_ids`, positions count real tokens (`cumsum(attention_mask) - 1`, as `generate()`
does), so that a left-padded row gets the positions, windows and compression blocks it would get alone.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, SequenceParallel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, is_torchdynamo_compiling
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention_compressed import (
    global_branch_attention,
    indexed_block_means,
    indexed_global_branch_attention,
)
from .attention_eager import eager_windowed_attention
from .attention_flex import flex_windowed_attention
from .attention_quantized import quantized_one_query_attention
from .attention_sdpa import sdpa_windowed_attention
from .attention_selective import selective_global_branch_attention
from .cache_blocks import CompressedBlocks, OnePassBlocks, OnePassSelectiveBlocks
from .cache_fastgpt import FastGPTDynamicCache, check_positions_are_distinct, check_positions_follow_cache
from .cache_quantization import QuantizedStates
from .checkpoints import FastGPTCheckpointMixin
from .configuration_fastgpt import DYNAMIC, GLOBAL_BRANCH_TYPES, SELECTIVE, FastGPTConfig
from .generation_fastgpt import FastGPTGenerationMixin
from .input_checks import check_inputs, check_position_ids

# Backends of windowed causal attention, one signature (see `attention_masks`): the model never branches on them.
WINDOWED_ATTENTION_FUNCTIONS: dict[str, Callable] = {
    "eager": eager_windowed_attention,
    "sdpa": sdpa_windowed_attention,
    "flex_attention": flex_windowed_attention,
}

# Tensor parallelism of a module that every key/value head shares (the block compressors): its parameters stay whole
# and replicated, its input comes heads-first `[K, ...]` split on dim 0, so DTensor sums the parameters' gradients
# over the ranks in every backward (right under gradient accumulation and microbatches). Heads go first because
# a Linear flattens its input's leading dims, and DTensor (torch 2.11) flattens only when the outermost one is split.
if torch.distributed.is_available():
    ALL_PARALLEL_STYLES.register("fastgpt_shared_by_heads", SequenceParallel(sequence_dim=0, use_local_output=True))


class FastGPTRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class FastGPTRotaryEmbedding(nn.Module):
    def __init__(self, config: FastGPTConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: FastGPTConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim))
        return inv_freq, 1.0

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[B, T, D]` in x's dtype for `position_ids` `[B, T]`; angles in float32 (float64 models: 64)."""
        angle_dtype = torch.promote_types(x.dtype, torch.float32)
        freqs = position_ids[..., None].to(angle_dtype) * self.inv_freq.to(device=x.device, dtype=angle_dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(query, key, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query `[B, H, T, D]` and key `[B, K, T, D]` by cos, sin `[B, T, D]`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


class FastGPTMLP(nn.Module):
    def __init__(self, config: FastGPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FastGPTAttention(nn.Module):
    """Grouped-query attention of a sliding or full layer, as Gemma 3 writes it: `self.sliding_window` is the
    layer's window (`config.attention_window`), None for a full layer; one code path for both."""

    def __init__(self, config: FastGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.attention_window(self.layer_type)
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_bias)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        positions_are_indices: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states `[B, T, hidden]`; attention_mask `[B, past + T]` (static cache: or `[B, T]`) bool or None;
        position_ids `[B, T]`; positions_are_indices: no cache, nothing padded and position_ids[:, t] == t (the
        model's default positions), which lets the dynamic layers' global branch skip its scatter."""
        query_states, key_states, value_states = self.project(hidden_states)
        attn_output, attn_weights = self.windowed_attention(
            query_states, key_states, value_states, position_embeddings, attention_mask, cache
        )
        return self.output(attn_output, hidden_states.shape[:-1]), attn_weights

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[B, T, hidden]` -> query `[B, H, T, D]`, key and value `[B, K, T, D]`, before rotary."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        return query_states, key_states, value_states

    def windowed_attention(
        self,
        query_states: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotary, the cache, then the backend of `config._attn_implementation` over `self.sliding_window` (and the
        attention sinks, `config.num_sink_tokens`): `[B, T, H, D]` and the weights (eager) or None. An int8 cache's
        one-token step returns its int8 keys and values, which `quantized_one_query_attention` reads as they are,
        whatever the backend (no weights)."""
        rotary_query, rotary_key = apply_rotary_pos_emb(query_states, key_states, *position_embeddings)
        if cache is None:
            all_keys, all_values, key_is_real = rotary_key, value_states, attention_mask
        else:
            all_keys, all_values, key_is_real = cache.update(rotary_key, value_states, self.layer_idx, attention_mask)
        arguments = (all_keys, all_values, key_is_real, self.sliding_window, self.scaling)
        if isinstance(all_keys, QuantizedStates):
            return quantized_one_query_attention(rotary_query, *arguments, self.config.num_sink_tokens), None
        windowed_attention = WINDOWED_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        dropout = self.attention_dropout if self.training else 0.0
        return windowed_attention(rotary_query, *arguments, dropout, self.config.num_sink_tokens)

    def output(self, attn_output: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        """`[B, T, H, D]` -> `o_proj` -> `[B, T, hidden]`. Contiguous as in Llama: the gate mix keeps sdpa's
        transposed strides, which a row-sharded o_proj (a DTensor declared with contiguous strides) cannot view."""
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


class FastGPTDynamicAttention(FastGPTAttention):
    """A `dynamic_attention` layer: the windowed attention of its class (window `dynamic_window`) mixed by a gate
    with a global branch over memory slots and compressed blocks (DESIGN.md section 2). The global branch runs the
    same code with or without a cache (`global_branch`)."""

    def __init__(self, config: FastGPTConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        memory_shape = (config.num_memory_tokens, config.num_key_value_heads, self.head_dim)
        self.memory_k = nn.Parameter(torch.zeros(memory_shape))
        self.memory_v = nn.Parameter(torch.zeros(memory_shape))
        self.compress_k = nn.Linear(self.head_dim, self.head_dim)
        self.compress_v = nn.Linear(self.head_dim, self.head_dim)
        self.mix_gate = nn.Linear(config.hidden_size, config.num_attention_heads, bias=True)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        positions_are_indices: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `FastGPTAttention.forward`; the output per head is `gate * local + (1 - gate) * global`."""
        query_states, key_states, value_states = self.project(hidden_states)
        local_output, attn_weights = self.windowed_attention(
            query_states, key_states, value_states, position_embeddings, attention_mask, cache
        )
        query_is_real = None if attention_mask is None else attention_mask[:, -hidden_states.shape[1] :]
        global_output = self.global_branch(
            query_states, key_states, value_states, position_ids, query_is_real, cache, positions_are_indices
        )
        gate_logits = self.mix_gate(hidden_states.to(self.mix_gate.weight.dtype)).to(local_output.dtype)
        # 1 - gate as sigmoid(-logit): exact where the gate is nearly local. Computed as 1 - sigmoid(logit) it would
        # round to 0 in bf16 from a logit of about 6.2 on (a converted model's gate starts at 7), and the global
        # branch and the gate would get no gradient.
        global_share = torch.sigmoid(-gate_logits)[..., None]  # [B, T, H, 1]
        attn_output = torch.lerp(local_output, global_output, global_share)  # gate * local + (1 - gate) * global
        return self.output(attn_output, hidden_states.shape[:-1]), attn_weights

    def global_branch(
        self,
        query_states: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        position_ids: torch.Tensor,
        query_is_real: torch.Tensor | None,
        cache: Cache | None,
        positions_are_indices: bool = False,
    ) -> torch.Tensor:
        """Memory slots and compressed blocks (pre-rotary query, key `[B, *, T, D]`) -> `[B, T, H, D]`."""
        block_size = self.config.compress_block_size
        dropout = self.attention_dropout if self.training else 0.0
        if cache is None and positions_are_indices:
            block_keys, block_values = self.compress_blocks(*indexed_block_means(key_states, value_states, block_size))
            return indexed_global_branch_attention(
                query_states,
                self.memory_k,
                self.memory_v,
                block_keys.to(query_states.dtype),
                block_values.to(query_states.dtype),
                block_size,
                self.scaling,
                dropout,
            )
        positions = position_ids.expand(query_states.shape[0], -1)
        blocks = self.block_state(cache)
        block_keys, block_values, counts = self.compressed_entries(
            blocks, key_states, value_states, positions, query_is_real
        )
        return global_branch_attention(
            query_states,
            positions,
            self.memory_k,
            self.memory_v,
            block_keys.to(query_states.dtype),
            block_values.to(query_states.dtype),
            counts,
            block_size,
            self.scaling,
            dropout,
        )

    def block_state(self, cache: Cache | None) -> CompressedBlocks:
        """Without a cache the pass's blocks live for this call only; with one, in the cache: the same code."""
        if cache is None:
            return OnePassBlocks(self.config.compress_block_size)
        return cache.layers[self.layer_idx]

    def compressed_entries(
        self,
        blocks: CompressedBlocks,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        query_is_real: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add pre-rotary keys and values `[B, K, T, D]` at `positions` `[B, T]` to `blocks`; return every compressed
        key and value `[B, K, C, D]` and the blocks' real-token counts `[B, C]`."""
        means = blocks.add_to_blocks(key_states, value_states, positions, query_is_real)
        return blocks.write_entries(*self.compress_blocks(means.key_means, means.value_means), means.written)

    def compress_blocks(self, key_means: torch.Tensor, value_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block means `[B, K, C, D]` -> compressed keys and values, the compressors run on `[K, B, C, D]` (their
        tensor-parallel style, `fastgpt_shared_by_heads`, splits dim 0)."""
        compressed = []
        for compressor, means in ((self.compress_k, key_means), (self.compress_v, value_means)):
            heads_first = means.transpose(0, 1).to(compressor.weight.dtype)
            compressed.append(compressor(heads_first).transpose(0, 1))
        return compressed[0], compressed[1]


class FastGPTSelectiveAttention(FastGPTDynamicAttention):
    """A `selective_attention` layer: the dynamic layer (its parameters, local branch and gate) whose global branch
    also attends exactly to the pre-rotary tokens of the `num_selected_blocks` visible blocks that each query's
    key/value-head group scores highest through their compressed entries (`attention_selective` has the rule). The
    same code with or without a cache; the cache keeps every complete block's tokens (`DynamicSelectiveLayer`)."""

    def global_branch(
        self,
        query_states: torch.Tensor,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        position_ids: torch.Tensor,
        query_is_real: torch.Tensor | None,
        cache: Cache | None,
        positions_are_indices: bool = False,
    ) -> torch.Tensor:
        """Memory slots, compressed blocks and the selected blocks' tokens (pre-rotary query, key `[B, *, T, D]`)
        -> `[B, T, H, D]`. `positions_are_indices` changes nothing here: one path."""
        tensor_parallel_size = getattr(getattr(self.config, "distributed_config", None), "tp_size", 1)
        if tensor_parallel_size > 1:
            raise ValueError(
                f"selective_attention layers do not run tensor-parallel yet (tp_size {tensor_parallel_size}): load "
                "the model without a tp_plan, or turn the selective layers into dynamic_attention in "
                "config.layer_types."
            )
        positions = position_ids.expand(query_states.shape[0], -1)
        blocks = self.block_state(cache)
        block_keys, block_values, counts = self.compressed_entries(
            blocks, key_states, value_states, positions, query_is_real
        )
        token_keys, token_values, token_is_real = blocks.block_tokens()
        dtype = query_states.dtype
        return selective_global_branch_attention(
            query_states,
            positions,
            self.memory_k,
            self.memory_v,
            block_keys.to(dtype),
            block_values.to(dtype),
            counts,
            token_keys.to(dtype),
            token_values.to(dtype),
            token_is_real,
            self.config.compress_block_size,
            self.config.num_selected_blocks,
            self.scaling,
            self.attention_dropout if self.training else 0.0,
        )

    def block_state(self, cache: Cache | None) -> OnePassSelectiveBlocks:
        if cache is None:
            return OnePassSelectiveBlocks(self.config.compress_block_size)
        return cache.layers[self.layer_idx]


ATTENTION_CLASSES = {DYNAMIC: FastGPTDynamicAttention, SELECTIVE: FastGPTSelectiveAttention}


class FastGPTDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: FastGPTConfig, layer_idx: int):
        super().__init__()
        attention_class = ATTENTION_CLASSES.get(config.layer_types[layer_idx], FastGPTAttention)
        self.self_attn = attention_class(config, layer_idx)
        self.mlp = FastGPTMLP(config)
        self.input_layernorm = FastGPTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = FastGPTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FastGPTPreTrainedModel(FastGPTCheckpointMixin, PreTrainedModel):
    config: FastGPTConfig
    config_class = FastGPTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["FastGPTDecoderLayer"]
    # The global branch's small parts: never quantized (quantizers skip these) and kept float32 when loading fp16.
    _keep_in_fp32_modules = ["memory_k", "memory_v", "compress_k", "compress_v", "mix_gate"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_record_outputs = {"hidden_states": FastGPTDecoderLayer, "attentions": FastGPTAttention}
    checkpoint_auto_classes = {"AutoModel": "FastGPTModel", "AutoModelForCausalLM": "FastGPTForCausalLM"}

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """Attention reads `config._attn_implementation` at every call, so `set_attn_implementation` works."""
        return True

    def _init_weights(self, module: nn.Module) -> None:
        """Llama's init, plus a global branch that matters from the first step.

        Memory slots start at the scale of projected keys and values (std `initializer_range * sqrt(hidden)`),
        the compressors at the identity (a block's entry starts as its mean key / value), and the gate at 0.5.
        """
        super()._init_weights(module)
        if isinstance(module, FastGPTDynamicAttention):
            std = self.config.initializer_range * self.config.hidden_size**0.5
            init.normal_(module.memory_k, mean=0.0, std=std)
            init.normal_(module.memory_v, mean=0.0, std=std)
            for compressor in (module.compress_k, module.compress_v):
                init.eye_(compressor.weight)
                init.zeros_(compressor.bias)

    def attention_sparsity(self, seq_len: int) -> list[float]:
        """Fraction of the `seq_len x seq_len` score matrix each layer skips (DESIGN.md section 3).

        A query at position i scores min(i + 1, window) keys in a sliding layer, i + 1 in a full layer, and in a
        dynamic layer min(i + 1, dynamic_window) local keys plus the memory slots and its (i + 1) // b blocks; a
        selective layer adds the b tokens of each of its min(num_selected_blocks, (i + 1) // b) selected blocks.
        Attention sinks add, to every windowed query, the min(num_sink_tokens, i + 1 - window) first positions
        beyond its window.
        """
        config = self.config
        scored_by_position = torch.arange(1, seq_len + 1, dtype=torch.float64)
        fractions = []
        for layer_type in config.layer_types:
            window = config.attention_window(layer_type)
            scored = scored_by_position if window is None else scored_by_position.clamp(max=window)
            if window is not None:
                scored = scored + (scored_by_position - window).clamp(min=0, max=config.num_sink_tokens)
            if layer_type in GLOBAL_BRANCH_TYPES:
                blocks = scored_by_position // config.compress_block_size
                scored = scored + config.num_memory_tokens + blocks
            if layer_type == SELECTIVE:
                scored = scored + blocks.clamp(max=config.num_selected_blocks) * config.compress_block_size
            fractions.append(1.0 - scored.sum().item() / seq_len**2)
        return fractions


class FastGPTModel(FastGPTPreTrainedModel):
    # A causal-LM checkpoint loads into the base model: its output head is the one tensor left out on purpose.
    _keys_to_ignore_on_load_unexpected = {r"^lm_head\."}

    def __init__(self, config: FastGPTConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [FastGPTDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = FastGPTRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = FastGPTRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        if self.config._attn_implementation not in WINDOWED_ATTENTION_FUNCTIONS:
            raise ValueError(
                f"FastGPT has no {self.config._attn_implementation!r} attention; "
                f"use one of {sorted(WINDOWED_ATTENTION_FUNCTIONS)}."
            )
        if use_cache and cache is None:
            cache = FastGPTDynamicCache(self.config)
        check_inputs(input_ids, inputs_embeds, attention_mask, cache, self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        query_length = inputs_embeds.shape[1]
        past_length = self.past_length(cache, query_length)
        padding_mask = self.padding_mask(attention_mask)
        positions_are_indices = position_ids is None and padding_mask is None and cache is None
        if position_ids is None:
            # A padded mask of the new tokens alone (static cache, `check_inputs`) cannot count positions from the
            # start; compiled code, which does not read the cache's counter, gets position_ids from generate().
            padded_new_tokens_only = padding_mask is not None and not is_torchdynamo_compiling()
            if padded_new_tokens_only and padding_mask.shape[1] != past_length + query_length:
                raise ValueError(
                    "With an attention_mask of the new tokens only, pass position_ids too (their positions among "
                    "the real tokens); or pass the mask of every token so far, (batch, cached + new tokens)."
                )
            position_ids = self.positions(padding_mask, past_length, query_length, inputs_embeds.device)
        elif not is_torchdynamo_compiling():
            check_position_ids(position_ids, inputs_embeds.shape[0], past_length, query_length)
            new_is_real = None if padding_mask is None else padding_mask[:, -query_length:]
            if cache is not None:
                check_positions_follow_cache(cache, position_ids, new_is_real)
            if SELECTIVE in self.config.layer_types:
                check_positions_are_distinct(cache, position_ids, new_is_real)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=padding_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                positions_are_indices=positions_are_indices,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)

    def past_length(self, cache: Cache | None, query_length: int) -> int | torch.Tensor:
        """Tokens already cached, with the position limits checked. In compiled code the static cache's 0-d device
        counter comes back unchecked: reading it would synchronize, and generate() checks the limits beforehand."""
        past_length = 0 if cache is None else cache.get_seq_length()
        if is_torchdynamo_compiling():
            return past_length
        past_length = int(past_length)
        total_length = past_length + query_length
        if total_length > self.config.max_position_embeddings:
            raise ValueError(
                f"Input reaches {total_length} positions ({past_length} cached + {query_length} new), "
                f"more than max_position_embeddings={self.config.max_position_embeddings}; shorten the input."
            )
        if cache is not None:
            cache.check_room(past_length, query_length)
        return past_length

    @staticmethod
    def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The 2D mask `[B, L]` as bool, or None when nothing is padded (mask-free kernels)."""
        if attention_mask is None:
            return None
        padding_mask = attention_mask.bool()
        if not is_torchdynamo_compiling() and bool(padding_mask.all()):
            return None
        return padding_mask

    @staticmethod
    def positions(
        padding_mask: torch.Tensor | None, past_length: int | torch.Tensor, query_length: int, device: torch.device
    ) -> torch.Tensor:
        """`[B or 1, T]` positions counting real tokens only, so left padding shifts nothing."""
        if padding_mask is None:
            return (torch.arange(query_length, device=device) + past_length)[None]
        return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_length:]


class FastGPTLanguageModelingHead:
    """The last step of the causal LM and the captioning model: `lm_head` and the loss. One method, so that
    `fastgpt_hf.liger` can swap it for Liger's fused linear cross-entropy, which never builds the logits."""

    def logits_and_loss(
        self,
        hidden_states: torch.Tensor,
        labels: torch.LongTensor | None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """hidden_states `[B, T, hidden]` -> logits `[B, T or logits_to_keep, vocab]` and, with labels `[B, T]`
        (-100 where no loss), the next-token cross-entropy (`self.loss_function`), else None. A swapped-in head
        may return None logits when it computes the loss without them."""
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        loss = None
        if labels is not None:
            vocab_size = self.config.get_text_config().vocab_size
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return logits, loss


class FastGPTForCausalLM(FastGPTPreTrainedModel, FastGPTLanguageModelingHead, FastGPTGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: FastGPTConfig):
        super().__init__(config)
        self.model = FastGPTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits, loss = self.logits_and_loss(outputs.last_hidden_state, labels, logits_to_keep, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["FastGPTForCausalLM", "FastGPTLanguageModelingHead", "FastGPTModel", "FastGPTPreTrainedModel"]
