"""`FastGPTProcessor`: an image processor and a tokenizer, with FastGPT's image prompt format.

Each `<image>` in the text is expanded into `num_image_tokens` placeholder tokens, one per patch feature the model
writes there (`FastGPTVLConfig.image_seq_length`). The prompt format, also the chat template: the user's images as
`<image>` then their text; an assistant turn is its text followed by `</s>`. A captioning prompt is therefore
`"<image>caption:"` and the model continues with the caption. Without torchvision, pass a PIL-backend image
processor (e.g. `SiglipImageProcessorPil`); it saves and loads through `AutoProcessor` as any other.
"""

from transformers.processing_utils import ProcessorMixin

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


class FastGPTProcessor(ProcessorMixin):
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 196,
        image_token: str = "<image>",
        chat_template: str | None = None,
        **kwargs,
    ):
        """image_processor: any Transformers image processor; tokenizer: one that knows `image_token` as a single
        (special) token; num_image_tokens: placeholders per image, the model's `config.image_seq_length`."""
        if tokenizer is not None and tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
            raise ValueError(
                f"The tokenizer has no token {image_token!r}; add it first, e.g. "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})."
            )
        if num_image_tokens <= 0:
            raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens}.")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = None if tokenizer is None else tokenizer.convert_tokens_to_ids(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text standing for one image: `num_image_tokens` placeholders."""
        return self.image_token * self.num_image_tokens

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["FastGPTProcessor"]
