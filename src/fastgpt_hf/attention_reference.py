"""The float64 dense reference of FastGPT: the oracle every fast path is tested against (DESIGN.md section 5).

Written for reading, not speed: it recomputes a whole `FastGPTForCausalLM` forward from the model's weights,
building each layer's full score matrices from DESIGN.md's rules with explicit n x n masks and the block-averaging
matrix P of the compressed branch (`Q (P K)^T`); a selective layer's global branch adds one column per token,
allowed where the token's block is among the query's selected blocks (`top_blocks`, ranks counted pair by pair;
README, "The selective layer"). Attention sinks (`num_sink_tokens`; README, "Attention sinks") are found row by
row (`sink_tokens`) and added to the windowed layers' mask, causally. It shares no attention code with the model;
its masks are composed from the same mask functions (`attention_masks`), evaluated densely on every (query, key)
pair. With `kv_quantization="int8"` the windowed attention reads each token's rotary key and value as an int8 cache
keeps them (`cache_quantization.quantize`, then `dequantize` in float64); the global branch reads them unrounded, as
the caches' block sums do.
"""

import torch
from transformers.masking_utils import and_masks, causal_mask_function, padding_mask_function, sliding_window_overlay

from .attention_masks import compressed_visibility, dense_mask
from .cache_quantization import check_kv_quantization, dequantize, quantize
from .configuration_fastgpt import GLOBAL_BRANCH_TYPES, SELECTIVE


def reference_logits(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    kv_quantization: str | None = None,
) -> torch.Tensor:
    """Float64 logits `[B, T, V]` of `model` (a `FastGPTForCausalLM`) for `input_ids` `[B, T]`.

    `attention_mask` `[B, T]` marks real tokens (1) and padding (0). Without `position_ids`, positions count real
    tokens, as the model does. Rows of padding tokens come out as whatever they are and are not to be compared.
    `kv_quantization`: the windowed attention's keys and values as a cache of that quantization holds them (module
    docstring); None, exact.
    """
    check_kv_quantization(kv_quantization)
    config = model.config
    # Differentiable in the parameters, so that gradients can be checked against it too.
    weights = {name: tensor.to(torch.float64) for name, tensor in model.named_parameters()}
    if "lm_head.weight" not in weights:  # tied embeddings
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    batch, length = input_ids.shape
    device = input_ids.device
    is_real = torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        is_real = attention_mask.bool()
    if position_ids is None:
        position_ids = (is_real.long().cumsum(-1) - 1).clamp(min=0)
    position_ids = position_ids.expand(batch, length)
    hidden = weights["model.embed_tokens.weight"][input_ids]
    cos, sin = rotary_tables(model, position_ids)
    for layer_idx, layer_type in enumerate(config.layer_types):
        prefix = f"model.layers.{layer_idx}."
        layer = {name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)}
        normed = rms_norm(hidden, layer["input_layernorm.weight"], config.rms_norm_eps)
        hidden = hidden + attention(config, layer, layer_type, normed, cos, sin, position_ids, is_real, kv_quantization)
        normed = rms_norm(hidden, layer["post_attention_layernorm.weight"], config.rms_norm_eps)
        gate = normed @ layer["mlp.gate_proj.weight"].T
        up = normed @ layer["mlp.up_proj.weight"].T
        hidden = hidden + (torch.nn.functional.silu(gate) * up) @ layer["mlp.down_proj.weight"].T
    hidden = rms_norm(hidden, weights["model.norm.weight"], config.rms_norm_eps)
    return hidden @ weights["lm_head.weight"].T


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)


def rotary_tables(model, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[B, T, D]` in float64 from the model's inverse frequencies."""
    rotary = model.model.rotary_emb
    angles = position_ids[..., None].double() * rotary.inv_freq.double()
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on `[B, heads, T, D]`: pairs (x_j, x_{j + D/2}) turn by the position's angle."""
    half = states.shape[-1] // 2
    rotated_half = torch.cat([-states[..., half:], states[..., :half]], dim=-1)
    return states * cos[:, None] + rotated_half * sin[:, None]


def heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`[B, T, n * D]` -> `[B, n, T, D]`."""
    batch, length, _ = states.shape
    return states.view(batch, length, -1, head_dim).transpose(1, 2)


def masked_softmax_attention(scores: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Softmax of `scores` over allowed entries only; a row with none allowed gives zeros."""
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights @ values


def attention(config, layer, layer_type, normed, cos, sin, position_ids, is_real, kv_quantization=None) -> torch.Tensor:
    """One layer's attention output `[B, T, hidden]`, every score matrix dense."""
    head_dim, groups = config.head_dim, config.num_attention_heads // config.num_key_value_heads
    scale = head_dim**-0.5
    query = heads(normed @ layer["self_attn.q_proj.weight"].T, head_dim)
    key = heads(normed @ layer["self_attn.k_proj.weight"].T, head_dim).repeat_interleave(groups, dim=1)
    value = heads(normed @ layer["self_attn.v_proj.weight"].T, head_dim).repeat_interleave(groups, dim=1)
    batch, length = is_real.shape
    # DESIGN.md's rule as written there: causal, within the window, never a padding key (no own-key exception).
    rule = [causal_mask_function, padding_mask_function(is_real)]
    window = config.attention_window(layer_type)
    if window is not None:
        rule.append(sliding_window_overlay(window))
    local_allowed = dense_mask(and_masks(*rule), batch, length, length, normed.device)  # [B, 1, T, T]
    if window is not None and config.num_sink_tokens > 0:
        causal = torch.ones(length, length, dtype=torch.bool, device=normed.device).tril()
        sinks = sink_tokens(is_real, config.num_sink_tokens)
        local_allowed = local_allowed | (causal & sinks[:, None, None, :])
    local_key, local_value = rotate(key, cos, sin), value
    if kv_quantization is not None:  # what the cache keeps of each token (a head repeated G times rounds alike)
        local_key, local_value = (dequantize(quantize(states)) for states in (local_key, local_value))
    local_scores = rotate(query, cos, sin) @ local_key.transpose(-1, -2) * scale
    output = masked_softmax_attention(local_scores, local_allowed, local_value)  # [B, H, T, D]
    if layer_type in GLOBAL_BRANCH_TYPES:
        branch = selective_global_attention if layer_type == SELECTIVE else compressed_global_attention
        global_output = branch(config, layer, query, key, value, position_ids, is_real, scale)
        gate = torch.sigmoid(normed @ layer["self_attn.mix_gate.weight"].T + layer["self_attn.mix_gate.bias"])
        gate = gate.transpose(1, 2)[..., None]  # [B, H, T, 1]
        output = gate * output + (1 - gate) * global_output
    return output.transpose(1, 2).reshape(batch, length, -1) @ layer["self_attn.o_proj.weight"].T


def sink_tokens(is_real: torch.Tensor, count: int) -> torch.Tensor:
    """`[B, T]` bool: the first `count` real tokens of each row (`is_real` `[B, T]`), the attention sinks."""
    sinks = torch.zeros_like(is_real)
    for row in range(is_real.shape[0]):
        sinks[row, is_real[row].nonzero().flatten()[:count]] = True
    return sinks


def compressed_global_attention(config, layer, query, key, value, position_ids, is_real, scale) -> torch.Tensor:
    """Pre-rotary query over [memory slots; compress(P K)] with P the block-averaging matrix; `[B, H, T, D]`."""
    keys, values, allowed, _ = global_entries(config, layer, key, value, position_ids, is_real)
    return masked_softmax_attention(query @ keys.transpose(-1, -2) * scale, allowed, values)


def global_entries(config, layer, key, value, position_ids, is_real):
    """The global branch's keys and values `[B, H, M + C, D]` (memory slots, then compress(P K), compress(P V)),
    which of them each query sees `[B, 1, T, M + C]`, and each token's block `[B, T]`."""
    block_size, groups = config.compress_block_size, config.num_attention_heads // config.num_key_value_heads
    batch, device = key.shape[0], key.device
    num_blocks = int(position_ids.max()) // block_size + 1
    block_of = position_ids // block_size  # [B, T]
    block_index = torch.arange(num_blocks, device=device)
    members = (block_of[:, None, :] == block_index[None, :, None]) & is_real[:, None, :]  # [B, C, T]
    counts = members.sum(-1)  # [B, C]
    averaging = members.double() / counts.clamp(min=1)[..., None]  # P: [B, C, T]
    block_keys = averaging[:, None] @ key  # [B, H, C, D]
    block_values = averaging[:, None] @ value
    block_keys = block_keys @ layer["self_attn.compress_k.weight"].T + layer["self_attn.compress_k.bias"]
    block_values = block_values @ layer["self_attn.compress_v.weight"].T + layer["self_attn.compress_v.bias"]
    memory_keys = layer["self_attn.memory_k"].repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, M, D]
    memory_values = layer["self_attn.memory_v"].repeat_interleave(groups, dim=1).transpose(0, 1)
    keys = torch.cat([memory_keys.expand(batch, -1, -1, -1), block_keys], dim=2)
    values = torch.cat([memory_values.expand(batch, -1, -1, -1), block_values], dim=2)
    allowed = compressed_visibility(position_ids, counts, block_size, config.num_memory_tokens)  # [B, 1, T, M + C]
    return keys, values, allowed, block_of


def selective_global_attention(config, layer, query, key, value, position_ids, is_real, scale) -> torch.Tensor:
    """The selective layer's global branch (`attention_selective` states the rule), one dense score matrix: the
    pre-rotary query over [memory slots; compress(P K); every token's pre-rotary key], where a token is allowed when
    it is real and its block is among the query's selected blocks; `[B, H, T, D]`."""
    groups, memory = config.num_attention_heads // config.num_key_value_heads, config.num_memory_tokens
    keys, values, allowed, block_of = global_entries(config, layer, key, value, position_ids, is_real)
    entry_scores = query @ keys.transpose(-1, -2) * scale  # [B, H, T, M + C]
    batch, heads, length, num_entries = entry_scores.shape
    # Selection score: the block logits summed over the heads that share a key/value head, given back to each head.
    group_scores = entry_scores[..., memory:].detach().unflatten(1, (heads // groups, groups)).sum(2)  # [B, K, T, C]
    selected = top_blocks(group_scores, allowed[..., memory:], config.num_selected_blocks)
    selected = selected.repeat_interleave(groups, dim=1)  # [B, H, T, C]
    token_block = block_of[:, None, None, :].expand(batch, heads, length, -1)  # [B, H, T, S]
    token_allowed = selected.gather(-1, token_block) & is_real[:, None, None, :]
    scores = torch.cat([entry_scores, query @ key.transpose(-1, -2) * scale], dim=-1)
    allowed = torch.cat([allowed.expand(batch, heads, -1, -1), token_allowed], dim=-1)
    return masked_softmax_attention(scores, allowed, torch.cat([values, value], dim=2))


def top_blocks(scores: torch.Tensor, visible: torch.Tensor, count: int) -> torch.Tensor:
    """Bool `[..., T, C]`: the `count` visible blocks of highest score per query (all visible ones if fewer). Block c
    ranks below every visible block c' with a higher score, or an equal score and c' < c (ties: lower index)."""
    score_c, score_other = scores[..., :, None], scores[..., None, :]  # [..., T, C (c), 1] and [..., T, 1, C (c')]
    index = torch.arange(scores.shape[-1], device=scores.device)
    beats = (score_other > score_c) | ((score_other == score_c) & (index[None, :] < index[:, None]))
    rank = (beats & visible[..., None, :]).sum(-1)  # [..., T, C]
    return visible & (rank < count)
