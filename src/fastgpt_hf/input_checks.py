"""Checks of a FastGPT forward pass's inputs: a `ValueError` naming the argument, what was given and what fits.

`check_inputs` (ids or embeddings, the attention mask, the cache) runs first in `FastGPTModel.forward`, the
captioning model's forward and `generate()`'s prompt check; `check_token_ids` keeps ids inside the vocabulary;
`check_position_ids` holds explicit positions to the tokens seen. They read shapes and dtypes, and tensor values only
where that costs no synchronisation (not in compiled code, nor while a CUDA graph is captured).
"""

import torch
from transformers.cache_utils import Cache
from transformers.utils import is_torchdynamo_compiling

from .cache_fastgpt import check_cache
from .configuration_fastgpt import FastGPTConfig


def check_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    config: FastGPTConfig,
) -> None:
    """Raise a ValueError naming the argument, the shape given and the shape expected, unless the inputs fit: exactly
    one of input_ids `[B, T]` (torch.long or torch.int) and inputs_embeds `[B, T, hidden_size]`, B and T at least 1;
    a cache built for this model holding B rows (`check_cache`); attention_mask `[B, cached + T]`, or a width the
    cache names (`attention_mask_lengths`: the static cache, which flags its real slots itself, takes `[B, T]` for the
    new tokens, which generate()'s compiled decode passes).

    Token ids must lie in [0, vocab_size) (`check_token_ids`: one min/max, skipped where it would synchronise a
    decode step). Otherwise shapes and dtypes only, no tensor value is read: in compiled code this costs nothing, and
    there the static cache's 0-d counter is not read either (reading it would synchronize), so its mask must be the
    new tokens'."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None and (input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int)):
        raise ValueError(
            "input_ids must be token ids of shape (batch, tokens) and dtype torch.long or torch.int (one sequence: "
            f"input_ids[None]); got shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}."
        )
    if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[2] != config.hidden_size):
        raise ValueError(
            f"inputs_embeds must have shape (batch, tokens, hidden_size) = (batch, tokens, {config.hidden_size}); "
            f"got {tuple(inputs_embeds.shape)}."
        )
    name, tokens = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
    batch_size, query_length = tokens.shape[:2]
    if batch_size == 0 or query_length == 0:
        raise ValueError(
            f"{name} has shape {tuple(tokens.shape)}, an empty input: give at least one row of at least one token "
            "(e.g. a BOS token)."
        )
    if input_ids is not None:
        check_token_ids(input_ids, config.vocab_size)
    if cache is not None:
        check_cache(cache, config, batch_size)
    if attention_mask is None:
        return
    lengths = (query_length,) if cache is None else cache.attention_mask_lengths(query_length)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size or attention_mask.shape[1] not in lengths:
        raise ValueError(
            f"attention_mask must have shape (batch, cached + new tokens) = ({batch_size}, {lengths[0]}), 1 for "
            f"tokens and 0 for padding; got shape {tuple(attention_mask.shape)}."
        )


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a ValueError naming an id of `input_ids` `[B, T]` outside [0, vocab_size), where the embedding would
    raise an IndexError (CPU) or a device-side assert (CUDA).

    One min/max reduction. Not in compiled code nor while a CUDA graph is captured (reading a value back would end
    the capture), and on an accelerator not for one-token steps: reading a decode step's id would synchronise with
    the device at every step, and generate() feeds back ids the model chose among its `vocab_size` logits after
    checking the prompt here."""
    if is_torchdynamo_compiling() or input_ids.device.type == "meta":
        return
    if input_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if input_ids.device.type != "cpu" and input_ids.shape[1] == 1:
        return
    lowest, highest = (int(value) for value in torch.aminmax(input_ids))
    if lowest < 0 or highest >= vocab_size:
        bad_id = lowest if lowest < 0 else highest
        raise ValueError(
            f"input_ids holds token id {bad_id}, outside this model's vocabulary [0, {vocab_size}) "
            f"(config.vocab_size = {vocab_size}). Encode the text with the model's own tokenizer; after adding tokens "
            "to a tokenizer, call model.resize_token_embeddings(len(tokenizer))."
        )


def check_position_ids(position_ids: torch.Tensor, batch_size: int, past_length: int, query_length: int) -> None:
    """Raise a ValueError unless `position_ids` is `[B or 1, T]` and counts tokens from 0: a token's position is at
    most its index among the cached and new tokens (left padding makes it smaller). The dynamic layers' blocks are
    sized by the tokens seen, so a larger position has no block."""
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch_size) or position_ids.shape[1] != query_length:
        raise ValueError(
            f"position_ids must have shape (batch, new tokens) = ({batch_size}, {query_length}); got "
            f"{tuple(position_ids.shape)} (generate() derives them from attention_mask, which must then cover every "
            "token so far)."
        )
    lowest, highest = (int(value) for value in torch.aminmax(position_ids))
    if lowest < 0 or highest >= past_length + query_length:
        raise ValueError(
            f"position_ids must be in [0, {past_length + query_length}): positions count the tokens so far from 0 "
            f"({past_length} cached + {query_length} new); got values from {lowest} to {highest}."
        )


__all__ = ["check_inputs", "check_position_ids", "check_token_ids"]
