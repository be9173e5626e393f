"""`generate()` with FastGPT's caches: the mixin every FastGPT model class that generates inherits.

It builds the cache from `config.layer_types` (dynamic, static, or on CUDA by default the compiled fast path of
`generation_fast_path`), checks a prompt against a cache passed in, prepares caches for assisted decoding's
rollbacks, and hands generate() the new tokens' padding mask in place of a 4D mask (FastGPT builds each layer's
visibility itself, `attention_masks`). `generation_config.cache_config` (Transformers' arguments of the cache
generate() builds) takes one key, `kv_quantization` (`cache_quantization`), for the static caches.
"""

import torch
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin, GenerationMode

from .cache_fastgpt import FastGPTDynamicCache, FastGPTStaticCache
from .cache_quantization import check_kv_quantization
from .generation_fast_path import fast_path_cache, release_fast_path_cache, uses_cuda_fast_path
from .input_checks import check_inputs


class FastGPTGenerationMixin(GenerationMixin):
    """`generate()` with FastGPT's cache; for any model whose (text) config is a `FastGPTConfig`."""

    def _prepare_model_inputs(
        self, inputs: torch.Tensor | None, bos_token_id: torch.Tensor | None, model_kwargs: dict
    ) -> tuple[torch.Tensor, str, dict]:
        """Transformers' choice of the prompt tensor, checked before `generate()` reads its shape: `check_inputs`
        (the attention_mask covers the prompt), and a cache passed in must hold fewer tokens than the prompt, whose
        first tokens it holds (prefix caching: the prompt extends what the cache has seen)."""
        inputs_tensor, input_name, model_kwargs = super()._prepare_model_inputs(inputs, bos_token_id, model_kwargs)
        prompt = {"input_ids": None, "inputs_embeds": None, input_name: inputs_tensor}
        text_config = self.config.get_text_config(decoder=True)
        check_inputs(**prompt, attention_mask=model_kwargs.get("attention_mask"), cache=None, config=text_config)
        cache, prompt_length = model_kwargs.get("cache"), inputs_tensor.shape[1]
        cached_length = int(cache.get_seq_length()) if isinstance(cache, Cache) else 0
        if cached_length >= prompt_length:
            raise ValueError(
                f"The cache already holds {cached_length} tokens and the prompt has only {prompt_length}: "
                "generate() continues a cache with a prompt that starts with the tokens it holds and adds at least "
                "one. Pass a fresh cache (or none), or a deep copy (copy.deepcopy) of the cache of a prefix of this "
                "prompt."
            )
        return inputs_tensor, input_name, model_kwargs

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`; the fast path's kept cache (`generation_fast_path`) is released at the end."""
        try:
            return super().generate(*args, **kwargs)
        finally:
            release_fast_path_cache(self)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`generate()`'s cache, built from `config.layer_types` instead of Transformers' table of layer kinds.

        `cache_implementation` None, "dynamic" or "offloaded" gives a `FastGPTDynamicCache`; "static" or
        "offloaded_static" a `FastGPTStaticCache` of `max(max_cache_length, generation_config.max_cache_len)`
        positions. None on CUDA, where `generation_fast_path.uses_cuda_fast_path` allows it, gives that static
        cache with a bucketed length, marked dynamic, which generate() then compiles once for every length
        (`generation_fast_path.fast_path_cache`).
        A cache passed by the user is checked against the prompt by `_prepare_model_inputs` and against the model
        by the forward pass. `cache_config={"kv_quantization": "int8"}` (`requested_kv_quantization`) builds either
        static cache with int8 keys and values; the dynamic cache has no quantized form, and refuses it.
        """
        text_config = self.config.get_text_config(decoder=True)
        if generation_config.max_length > text_config.max_position_embeddings:
            raise ValueError(
                f"generate() would reach {generation_config.max_length} positions (prompt + max_new_tokens), more "
                f"than max_position_embeddings={text_config.max_position_embeddings}; shorten the prompt or lower "
                "max_new_tokens."
            )
        implementation = generation_config.cache_implementation
        kv_quantization = requested_kv_quantization(generation_config)
        if model_kwargs.get("cache") is not None or not generation_config.use_cache:
            check_given_cache_quantization(model_kwargs.get("cache"), kv_quantization)
            super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        elif uses_cuda_fast_path(self, generation_config, generation_mode, model_kwargs):
            max_cache_length = max(max_cache_length, generation_config.max_cache_len or 0)
            rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1) * batch_size
            model_kwargs["cache"] = fast_path_cache(self, text_config, max_cache_length, rows, kv_quantization)
        elif implementation in (None, "dynamic", "offloaded"):
            if kv_quantization is not None:
                raise ValueError(
                    f"cache_config kv_quantization={kv_quantization!r} needs a static cache: FastGPT's dynamic cache "
                    f"(cache_implementation={implementation!r}"
                    f"{', the default here' if implementation is None else ''}) keeps keys and values in the "
                    "model's dtype. Pass cache_implementation='static' (or, on CUDA, leave cache_implementation "
                    "unset for the compiled fast path)."
                )
            model_kwargs["cache"] = FastGPTDynamicCache(text_config, offloading=implementation == "offloaded")
        elif implementation in ("static", "offloaded_static"):
            max_cache_length = max(max_cache_length, generation_config.max_cache_len or 0)
            # Prompt lookup drafts up to prompt_lookup_num_tokens past max_length (the excess is rejected).
            max_cache_length += generation_config.prompt_lookup_num_tokens or 0
            model_kwargs["cache"] = FastGPTStaticCache(
                text_config,
                max_cache_length,
                offloading=implementation == "offloaded_static",
                kv_quantization=kv_quantization,
            )
        else:
            raise ValueError(
                f"FastGPT has no {implementation!r} cache; use cache_implementation 'dynamic', 'offloaded', "
                "'static' or 'offloaded_static'."
            )
        self.prepare_cache_for_rollback(model_kwargs.get("cache"), generation_config, generation_mode)

    @staticmethod
    def prepare_cache_for_rollback(cache: Cache | None, generation_config, generation_mode) -> None:
        """Assisted, prompt-lookup and speculative decoding crop the cache after each verification: refuse a cache
        that cannot roll back (a static cache whose windows drop tokens), and let the cache FastGPT built for an
        assistant record what a rollback needs (Transformers does so only for the caches it builds itself)."""
        rolls_back = generation_mode == GenerationMode.ASSISTED_GENERATION or generation_config.is_assistant
        if cache is None or not rolls_back:
            return
        if not cache.is_croppable:
            raise ValueError(
                "Assisted, prompt-lookup and speculative decoding roll the cache back, and this static cache's "
                "windowed layers drop the tokens that leave their window (it holds max_cache_len positions, more "
                "than a window). Use the dynamic cache (cache_implementation='dynamic', the default) for these "
                "modes, or a max_cache_len no larger than sliding_window and dynamic_window."
            )
        if generation_config.is_assistant:
            cache.activate_past_recording()

    def create_masks_for_generate(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor | None:
        """The 2D padding mask of the new tokens (`inputs_embeds` `[B, T, *]`): `generate()` calls this for static
        caches only, which flag their real slots themselves. FastGPT builds each layer's visibility itself
        (`attention_masks`), so it takes no 4D mask; and a fixed shape keeps one CUDA graph for every decode step."""
        return None if attention_mask is None else attention_mask[:, -inputs_embeds.shape[1] :]


def requested_kv_quantization(generation_config) -> str | None:
    """`generation_config.cache_config["kv_quantization"]`, checked (None without one): FastGPT's caches take no
    other `cache_config` key, and a value they do not have is a ValueError naming those they have."""
    cache_config = generation_config.cache_config or {}
    unknown = sorted(set(cache_config) - {"kv_quantization"})
    if unknown:
        raise ValueError(
            f"FastGPT's caches take one cache_config key, 'kv_quantization'; got {unknown} in cache_config "
            f"{cache_config!r}."
        )
    kv_quantization = cache_config.get("kv_quantization")
    check_kv_quantization(kv_quantization)
    return kv_quantization


def check_given_cache_quantization(cache: Cache | None, kv_quantization: str | None) -> None:
    """Raise a ValueError if cache_config asks for a quantization that the cache passed to generate() lacks:
    cache_config shapes only the caches that generate() builds."""
    held = getattr(cache, "kv_quantization", None)
    if cache is not None and kv_quantization is not None and held != kv_quantization:
        raise ValueError(
            f"cache_config asks for kv_quantization={kv_quantization!r}, but generate() was given a "
            f"{type(cache).__name__} of kv_quantization={held!r}; cache_config applies to the caches generate() "
            "builds. Build the cache with it instead: FastGPTStaticCache(model.config, max_cache_len, "
            f"kv_quantization={kv_quantization!r})."
        )


__all__ = ["FastGPTGenerationMixin"]
