"""`FastGPTConfig`: the one source of truth for a FastGPT model's shape and attention layout.

Field names follow `LlamaConfig`; FastGPT adds the per-layer attention kind (`layer_types`) and the sizes of
its sliding windows, memory slots and compression blocks (DESIGN.md sections 2 and 3). Derived values
(`head_dim`, `num_key_value_heads`, the default three-stage `layer_types`) are filled in `__post_init__` and
nowhere else; every invalid value raises a `ValueError` that names the field, the value and what is allowed.

`fastgpt_hf_version` records the package version a checkpoint was written by: a config from another
major.minor version is refused (`validate_version`), and every config this code reads or builds is written back
with this code's version. The constant travels with the checkpoint's copied code, so a `trust_remote_code` load
checks it too.
"""

from huggingface_hub.dataclasses import strict
from transformers import configuration_utils
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

from .presets import PRESETS

# The package version (pyproject.toml reads it from here); checkpoints of the same major.minor are compatible.
FASTGPT_HF_VERSION = "0.1.0"

SLIDING = "sliding_attention"
DYNAMIC = "dynamic_attention"
FULL = "full_attention"
SELECTIVE = "selective_attention"
# The default three stages, shallow to deep; `selective_attention` is opt-in (README, "The selective layer").
STAGES = (SLIDING, DYNAMIC, FULL)
LAYER_TYPES = (*STAGES, SELECTIVE)
LAYER_TYPE_ALIASES = {"local": SLIDING, "dynamic": DYNAMIC, "global": FULL, "selective": SELECTIVE}
# The kinds with a gated global branch (memory slots, compressors, gate): the selective layer is a dynamic layer
# whose global branch also attends to the tokens of selected blocks.
GLOBAL_BRANCH_TYPES = (DYNAMIC, SELECTIVE)

# Transformers checks `layer_types` against its list of known layer kinds, also where it reads a FastGPT config.json
# through the base config class (Trainer's resume_from_checkpoint does): FastGPT's gated layer kinds join the list.
for _kind in GLOBAL_BRANCH_TYPES:
    if _kind not in configuration_utils.ALLOWED_ATTN_LAYER_TYPES:
        configuration_utils.ALLOWED_ATTN_LAYER_TYPES += (_kind,)
        configuration_utils.ALLOWED_LAYER_TYPES += (_kind,)


def is_real_number(value: object) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_layer_types(num_hidden_layers: int) -> list[str]:
    """Three stages of nearly equal size, shallow to deep: sliding, dynamic, full.

    When the depth is not a multiple of three, the earlier (cheaper) stages take the extra layers:
    16 layers give 6 sliding, 5 dynamic and 5 full.
    """
    base, extra = divmod(num_hidden_layers, 3)
    sizes = [base + (stage < extra) for stage in range(3)]
    return [kind for kind, size in zip(STAGES, sizes, strict=True) for _ in range(size)]


@strict
class FastGPTConfig(PreTrainedConfig):
    r"""
    Configuration of a FastGPT causal language model. The defaults are Llama-3.2-1B's sizes with multi-head
    attention (`num_key_value_heads` and `head_dim` derive from the heads when not given); the `1b` preset adds
    its grouped-query heads and rope theta.

    Args beyond `LlamaConfig`'s:
        layer_types (`list[str]`, *optional*):
            One entry per layer: `"sliding_attention"`, `"dynamic_attention"`, `"full_attention"` or
            `"selective_attention"` (aliases `"local"`, `"dynamic"`, `"global"`, `"selective"`). Defaults to three
            equal stages of the first three, in that order.
        sliding_window (`int`, defaults to 512):
            Keys seen by a `sliding_attention` query, itself included.
        dynamic_window (`int`, defaults to 1024):
            Keys seen by the local branch of a `dynamic_attention` or `selective_attention` query, itself included.
        num_memory_tokens (`int`, defaults to 8):
            Learned key/value slots per key/value head in the global branch of dynamic layers.
        compress_block_size (`int`, defaults to 64):
            Positions averaged into one compressed key/value entry; at most `dynamic_window`.
        num_selected_blocks (`int`, defaults to 4):
            Blocks whose tokens a `selective_attention` query's global branch attends to exactly, besides their
            compressed entries (the top-scoring visible blocks; README, "The selective layer").
        num_sink_tokens (`int`, defaults to 0):
            Attention sinks: every windowed query (`sliding_attention` layers and the local branch of
            `dynamic_attention` and `selective_attention` layers) also sees the first `num_sink_tokens` real tokens
            of its row, causally, besides its window; full layers are unchanged. 0 (the default) turns them off.
            Every cache keeps them (the static one too, so the compiled CUDA `generate()`, serving and the
            ExecuTorch export; README, "Attention sinks").
        fastgpt_hf_version (`str`, *optional*):
            The fastgpt_hf version that wrote the checkpoint; another major.minor raises a `ValueError`. Always
            holds this code's version once the config is built, so saving records it.

    ```python
    >>> from fastgpt_hf import FastGPTConfig
    >>> config = FastGPTConfig.from_preset("tiny")
    >>> config.layer_types
    ['sliding_attention', 'dynamic_attention', 'full_attention']
    ```
    """

    model_type = "fastgpt"
    keys_to_ignore_at_inference = ["cache"]
    default_theta = 10000.0
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        # Dynamic layers: the memory slots `[M, K, D]` and the gate's heads split with k/v_proj's and q_proj's
        # heads. The compressors are shared by the heads: `fastgpt_shared_by_heads` (registered by the modeling
        # module) keeps their parameters whole and takes their input split by key/value head.
        "layers.*.self_attn.memory_k": "colwise",
        "layers.*.self_attn.memory_v": "colwise",
        "layers.*.self_attn.mix_gate": "colwise",
        "layers.*.self_attn.compress_k": "fastgpt_shared_by_heads",
        "layers.*.self_attn.compress_v": "fastgpt_shared_by_heads",
        # The attention forward reads its own sharded memory slots as this rank's local heads.
        "layers.*.self_attn": "local_params",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 16
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float = 0.0
    mlp_bias: bool = False
    layer_types: list[str] | None = None
    sliding_window: int = 512
    dynamic_window: int = 1024
    num_memory_tokens: int = 8
    compress_block_size: int = 64
    num_selected_blocks: int = 4
    num_sink_tokens: int = 0
    fastgpt_hf_version: str | None = None

    def __post_init__(self, **kwargs):
        heads_are_positive = isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0
        # Derived only where the heads divide the width; otherwise validate_architecture names the bad field.
        if self.head_dim is None and heads_are_positive and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        else:
            self.layer_types = [LAYER_TYPE_ALIASES.get(kind, kind) for kind in self.layer_types]
        # Checked here as well as by `@strict` afterwards, so that a bad value surfaces as a plain `ValueError`; the
        # architecture after the base class has moved a legacy top-level `rope_theta` into `rope_parameters`.
        self.validate_layer_type()
        self.validate_version()
        self.fastgpt_hf_version = FASTGPT_HF_VERSION
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "FastGPTConfig":
        """The named size from `presets.PRESETS` (`tiny`, `small`, `125m`, `1b`, `13b`), with `overrides` applied."""
        if name not in PRESETS:
            raise ValueError(f"Unknown FastGPT preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    def attention_window(self, layer_type: str) -> int | None:
        """Keys a query of a `layer_type` layer sees in its windowed attention, itself included (a dynamic or
        selective layer: its local branch); None for a full layer, which sees every earlier key. The one place
        that maps a layer kind to its window: the attention, the caches, the reference and the reports all ask here."""
        windows = {SLIDING: self.sliding_window, DYNAMIC: self.dynamic_window, SELECTIVE: self.dynamic_window}
        return windows[layer_type] if layer_type != FULL else None

    def validate_layer_type(self):
        """Every entry a known kind (or alias), one entry per layer."""
        unknown = sorted({kind for kind in self.layer_types if kind not in LAYER_TYPES})
        if unknown:
            raise ValueError(
                f"layer_types contains {unknown}; allowed are {list(LAYER_TYPES)} "
                f"or their aliases {list(LAYER_TYPE_ALIASES)}."
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give exactly one entry per layer."
            )

    def validate_architecture(self):
        """Positive sizes, a sink count >= 0, heads that divide the width (without an explicit `head_dim`, as
        `LlamaConfig` requires), grouped-query heads that divide, blocks that fit in the dynamic window, and the
        numbers that would turn the forward pass into NaN: `rms_norm_eps` and rope theta must be positive,
        `initializer_range` non-negative."""
        positive_fields = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "sliding_window",
            "dynamic_window",
            "num_memory_tokens",
            "compress_block_size",
            "num_selected_blocks",
        )
        for field in positive_fields:
            value = getattr(self, field)
            if field == "head_dim" and value is None:  # left underived by __post_init__
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) to derive head_dim; change one of them or set head_dim."
                )
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}.")
        sinks = self.num_sink_tokens
        if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
            raise ValueError(f"num_sink_tokens must be an integer >= 0 (0 turns attention sinks off), got {sinks!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}); choose a num_key_value_heads that divides it."
            )
        if self.compress_block_size > self.dynamic_window:
            raise ValueError(
                f"compress_block_size ({self.compress_block_size}) must be at most dynamic_window "
                f"({self.dynamic_window})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not one of Transformers' activations: {sorted(ACT2FN)}."
            )
        if not 0 <= self.attention_dropout < 1:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id ({self.pad_token_id}) must be a token id below vocab_size ({self.vocab_size})."
            )
        if not is_real_number(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ValueError(
                f"rms_norm_eps must be a positive number, got {self.rms_norm_eps!r} (the norm divides by "
                "sqrt(mean square + rms_norm_eps): inf or NaN otherwise)."
            )
        rope_theta = (self.rope_parameters or {}).get("rope_theta", self.default_theta)
        if not is_real_number(rope_theta) or rope_theta <= 0:
            raise ValueError(
                f"rope_parameters['rope_theta'] must be a positive number, got {rope_theta!r} (the rotary "
                "frequencies are its powers)."
            )
        if not is_real_number(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(
                f"initializer_range must be a number >= 0 (the standard deviation of the initial weights), got "
                f"{self.initializer_range!r}."
            )
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_parameters['rope_type'] {rope_type!r} is unknown; use 'default' or one of "
                f"{sorted(ROPE_INIT_FUNCTIONS)}."
            )

    def validate_version(self):
        """A recorded `fastgpt_hf_version` must share this code's major.minor (None: a config built here)."""
        if self.fastgpt_hf_version is None:
            return
        if self.fastgpt_hf_version.split(".")[:2] != FASTGPT_HF_VERSION.split(".")[:2]:
            major_minor = ".".join(FASTGPT_HF_VERSION.split(".")[:2])
            raise ValueError(
                f"This checkpoint was written by fastgpt_hf {self.fastgpt_hf_version}, but this is fastgpt_hf "
                f"{FASTGPT_HF_VERSION}, which reads checkpoints of {major_minor}.x only; install "
                f"fastgpt_hf=={self.fastgpt_hf_version} or load with trust_remote_code=True to use the code saved "
                "beside the weights."
            )


__all__ = ["FastGPTConfig"]
