"""Windowed attention through PyTorch's fused attention kernels, never quadratic for windows.

Three paths, one rule (`attention_masks`), chosen per call from the shapes alone:
- keys no more than the window (every full layer, and any layer whose input fits its window): one sdpa call, the
  causal kernel when nothing is padded (as Llama), a dense mask otherwise;
- more keys than the window, nothing padded, no attention sinks, on a GPU with PyTorch's flash kernel: that kernel's
  own sliding window (`flash_window_attention`), one call that skips every key outside the band, forward and
  backward;
- otherwise (the CPU, padding, sinks, float32, dropout): queries in chunks of `window`, each against the
  `2 * window` keys that can reach it (and the row's sinks), so memory grows as T x window, not T x S.

Every call with a mask goes through `masked_sdpa`, which keeps gradients away from cuDNN's kernel (see there).
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention_masks import sink_token_mask, windowed_visibility

# sdpa's kernels for a masked call that gradients flow through: all but cuDNN's. On H100 / H200 with PyTorch 2.11
# cuDNN's backward returns NaN in the query's gradient when a mask is given, the query length is 64 more than a
# multiple of 128 and a row's logsumexp is below -ln(FLT_MAX) = -88.7 (pytorch/pytorch#196678): measured here as the
# loss of every variant with a dynamic layer turning NaN within 400 steps of the GPU recall probe (320-token blocks),
# whose global branch learns to score its entries very low. Inference keeps sdpa's own choice.
BACKWARD_SAFE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def masked_sdpa(query, key, value, mask, dropout: float, scale: float, enable_gqa: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention` with `attn_mask=mask`; where gradients flow through it (grad mode on and
    the query needs one), without cuDNN's kernel (`BACKWARD_SAFE_BACKENDS`), the key and value heads repeated to
    the query's (the remaining fused kernel with a mask, memory-efficient attention, takes no grouped heads; the
    math path would materialize the scores). `[B, H, T, D]` in and out."""
    if not (torch.is_grad_enabled() and query.requires_grad):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=enable_gqa
        )
    group = query.shape[1] // key.shape[1]
    if enable_gqa and group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    with sdpa_kernel(BACKWARD_SAFE_BACKENDS):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale)


def sdpa_windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_is_real: torch.Tensor | None,
    window: int | None,
    scaling: float,
    dropout: float = 0.0,
    num_sink_tokens: int = 0,
) -> tuple[torch.Tensor, None]:
    """Same contract as `eager_windowed_attention`; returns `([B, T, H, D], None)`. With attention sinks
    (`num_sink_tokens` > 0) the flash kernel's band, which has no sinks, is never taken: the blocked path instead."""
    arguments = (query, key, value, key_is_real, window, scaling, dropout, num_sink_tokens)
    if window is None or key.shape[2] <= window:
        return dense_sdpa_attention(*arguments), None
    if key_is_real is None and dropout == 0 and num_sink_tokens == 0 and flash_window_supported(query):
        return flash_window_attention(query, key, value, window, scaling), None
    if query.shape[2] > window:
        return blocked_window_attention(*arguments), None
    return dense_sdpa_attention(*arguments), None


def flash_window_supported(query: torch.Tensor) -> bool:
    """The flash kernel takes these queries: CUDA, half precision, a head size it has (multiple of 8, at most 256),
    on a device where it runs (`flash_kernel_enabled`)."""
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and head_dim % 8 == 0
        and head_dim <= 256
        and flash_kernel_enabled(query.device)
    )


@torch.compiler.assume_constant_result
def flash_kernel_enabled(device: torch.device) -> bool:
    """PyTorch was built with its flash kernel, sdpa's flash backend is on (`torch.nn.attention.sdpa_kernel` turns it
    off, the override for tests) and the device has compute capability 8.0 or newer. Compiled code reads this once,
    when it traces the call, instead of breaking its graph on the checks."""
    return (
        torch.backends.cuda.is_flash_attention_available()
        and torch.backends.cuda.flash_sdp_enabled()
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def flash_window_attention(query, key, value, window: int, scaling: float) -> torch.Tensor:
    """Sliding-window causal attention through the flash kernel's window: query t (at key index S - T + t, the
    kernel's bottom-right alignment) sees keys S - T + t - (window - 1) ... S - T + t, as `attention_masks` says.
    Grouped-query heads are native to the kernel; no mask is built. `[B, H, T, D]` in, `[B, T, H, D]` out."""
    output = torch.ops.aten._flash_attention_forward(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        None,
        None,
        query.shape[2],
        key.shape[2],
        0.0,
        True,
        False,
        scale=scaling,
        window_size_left=window - 1,
        window_size_right=0,
    )[0]
    return output


def dense_sdpa_attention(query, key, value, key_is_real, window, scaling, dropout, num_sink_tokens) -> torch.Tensor:
    """One sdpa call over all S keys; the causal kernel when no mask is needed."""
    query_length, key_length = query.shape[2], key.shape[2]
    within_window = window is None or key_length <= window
    needs_mask = key_is_real is not None or not within_window
    is_causal = not needs_mask and query_length == key_length and query_length > 1
    mask = None
    if needs_mask or (query_length != key_length and query_length > 1):
        mask = windowed_visibility(query_length, key_is_real, key_length, window, query.device, num_sink_tokens)
    if mask is None:
        output = F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, is_causal=is_causal, scale=scaling, enable_gqa=True
        )
    else:
        output = masked_sdpa(query, key, value, mask, dropout, scaling, enable_gqa=True)
    return output.transpose(1, 2)


def blocked_window_attention(query, key, value, key_is_real, window, scaling, dropout, num_sink_tokens) -> torch.Tensor:
    """Chunks of `window` queries against their `2 * window` keys: `[B*N, H, w, D]` x `[B*N, K, 2w, D]`; with
    attention sinks, each chunk's keys start with the row's n sinks (`[B*N, K, n + 2w, D]`)."""
    batch, heads, query_length, head_dim = query.shape
    sinks = None
    if num_sink_tokens > 0:  # gathered before the keys no window reaches are dropped: sinks may be among them
        sinks = row_sinks(key, value, key_is_real, num_sink_tokens)
        first_query_index = key.shape[2] - query_length
    # Keys older than the first query's window are never seen: keep at most window - 1 of the past.
    dropped = max(0, key.shape[2] - query_length - (window - 1))
    key, value = key[:, :, dropped:], value[:, :, dropped:]
    past_length = key.shape[2] - query_length
    num_chunks = -(-query_length // window)
    # Left padding aligns chunk n's keys to padded positions [n*w, n*w + 2w); right padding fills the last chunk.
    key_padding = (window - past_length, num_chunks * window - query_length)
    real = torch.ones(batch, key.shape[2], dtype=torch.bool, device=query.device)
    if key_is_real is not None:
        real = key_is_real[:, dropped:]
    real_chunks = F.pad(real, key_padding, value=False).unfold(1, 2 * window, window)  # [B, N, 2w]
    key_chunks = chunk_keys(key, key_padding, window)
    value_chunks = chunk_keys(value, key_padding, window)
    query_chunks = F.pad(query, (0, 0, 0, num_chunks * window - query_length))
    query_chunks = query_chunks.view(batch, heads, num_chunks, window, head_dim).transpose(1, 2)
    query_chunks = query_chunks.reshape(batch * num_chunks, heads, window, head_dim)
    # Query a of a chunk sits at padded key index a + w and sees padded keys j with a < j <= a + w.
    offset = torch.arange(2 * window, device=query.device)[None, :] - torch.arange(window, device=query.device)[:, None]
    band = (offset > 0) & (offset <= window)
    visible = band & (real_chunks[:, :, None, :] | (offset == window))  # [B, N, w, 2w]
    if sinks is not None:
        key_chunks, value_chunks, visible = with_sink_keys(
            key_chunks, value_chunks, visible, *sinks, first_query_index, window
        )
    mask = visible.reshape(batch * num_chunks, 1, window, -1)
    output = masked_sdpa(query_chunks, key_chunks, value_chunks, mask, dropout, scaling, enable_gqa=True)
    output = output.view(batch, num_chunks, heads, window, head_dim).permute(0, 1, 3, 2, 4)
    return output.reshape(batch, num_chunks * window, heads, head_dim)[:, :query_length]


def chunk_keys(states: torch.Tensor, padding: tuple[int, int], window: int) -> torch.Tensor:
    """`[B, K, S, D]` -> `[B*N, K, 2w, D]`: overlapping spans of 2w padded positions, one per query chunk."""
    _, kv_heads, _, head_dim = states.shape
    padded = F.pad(states, (0, 0, *padding))
    spans = padded.unfold(2, 2 * window, window)  # [B, K, N, D, 2w]
    spans = spans.permute(0, 2, 1, 4, 3)  # [B, N, K, 2w, D]
    return spans.reshape(-1, kv_heads, 2 * window, head_dim)


def row_sinks(
    key: torch.Tensor, value: torch.Tensor, key_is_real: torch.Tensor | None, num_sink_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's attention sinks (`attention_masks.sink_token_mask`) in key order: keys and values
    `[B, K, n, D]` (n = min(num_sink_tokens, S)), their key indices `[B, n]` and which of them are sinks `[B, n]`
    (a row with fewer real keys has fewer; the rest are other keys, never seen)."""
    batch, kv_heads, key_length, head_dim = key.shape
    real = torch.ones(1, key_length, dtype=torch.bool, device=key.device) if key_is_real is None else key_is_real
    is_sink = sink_token_mask(real, num_sink_tokens).expand(batch, -1)
    count = min(num_sink_tokens, key_length)
    # A stable sort puts each row's sinks first, in key order.
    index = torch.sort((~is_sink).to(torch.uint8), dim=1, stable=True).indices[:, :count]  # [B, n]
    gather_index = index[:, None, :, None].expand(-1, kv_heads, -1, head_dim)
    return key.gather(2, gather_index), value.gather(2, gather_index), index, is_sink.gather(1, index)


def with_sink_keys(
    key_chunks,
    value_chunks,
    visible,
    sink_keys,
    sink_values,
    sink_index,
    sink_is_real,
    first_query_index: int,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row's n sinks put before every chunk's keys (`[B*N, K, 2w, D]` -> `[B*N, K, n + 2w, D]`) and the mask
    `[B, N, w, 2w]` extended to `[B, N, w, n + 2w]`. Query a of chunk c sits at key index `first_query_index +
    c * w + a`; a sink column is seen where the sink is further back than the window: within it, the sink is among
    the chunk's own keys already and must not count twice."""
    batch, num_chunks = visible.shape[:2]
    kv_heads, count, head_dim = sink_keys.shape[1:]
    query_index = first_query_index + torch.arange(num_chunks * window, device=visible.device).view(num_chunks, window)
    distance = query_index[None, :, :, None] - sink_index[:, None, None, :]  # [B, N, w, n]
    sink_visible = sink_is_real[:, None, None, :] & (distance >= window)

    def per_chunk(states: torch.Tensor) -> torch.Tensor:  # [B, K, n, D] -> [B*N, K, n, D]
        return states[:, None].expand(-1, num_chunks, -1, -1, -1).reshape(-1, kv_heads, count, head_dim)

    key_chunks = torch.cat([per_chunk(sink_keys), key_chunks], dim=2)
    value_chunks = torch.cat([per_chunk(sink_values), value_chunks], dim=2)
    return key_chunks, value_chunks, torch.cat([sink_visible, visible], dim=-1)
