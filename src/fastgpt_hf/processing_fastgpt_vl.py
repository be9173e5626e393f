"""`FastGPTProcessor`: an image processor and a tokenizer, with FastGPT's prompt format for images and videos.

Each `<image>` in the text is expanded into `num_image_tokens` placeholder tokens, one per patch feature the model
writes there (`FastGPTVLConfig.image_seq_length`). Each `<video>` is expanded into `num_frames *
video_tokens_per_frame` placeholders: the processor samples `num_frames` evenly spaced frames (first and last
included) from a `[F, H, W, C]` array, a list of PIL frames or a video file (decoded by
`transformers.video_utils.load_video` where a decoder such as PyAV is installed), and runs each frame through the
image processor, giving `pixel_values_videos` `[N videos, num_frames, C, H, W]`. Transformers' video processors need
torchvision; sampling here and reusing the image processor keeps videos on PIL alone.

The prompt format, also the chat template: the user's images as `<image>` (videos as `<video>`) then their text; an
assistant turn is its text followed by `</s>`. A captioning prompt is therefore `"<image>caption:"` and the model
continues with the caption. Without torchvision, pass a PIL-backend image processor (e.g. `SiglipImageProcessorPil`);
it saves and loads through `AutoProcessor` as any other.
"""

import os
from functools import partial

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.video_utils import VideoMetadata, load_video, make_batched_videos

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>"
    "{% elif content['type'] == 'video' %}<video>{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def uniform_frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """`num_frames` evenly spaced indices into `total_frames` frames, the first and the last included."""
    if total_frames < num_frames:
        raise ValueError(
            f"A video has {total_frames} frames, fewer than num_frames={num_frames} sampled per video; give longer "
            "clips or a smaller num_frames (the model's placeholder count follows it)."
        )
    return np.linspace(0, total_frames - 1, num_frames).round().astype(int)


def sample_video(video, num_frames: int) -> np.ndarray:
    """`[num_frames, H, W, C]` frames of one video: an array, a list of PIL frames or a file path or URL (decoded
    only up to its last sampled frame)."""
    if isinstance(video, str):
        if not os.path.isfile(video) and not video.startswith(("http://", "https://")):
            raise ValueError(f"No video file at {video!r}; pass an existing path, an array or a list of PIL frames.")
        frames, _ = load_video(video, sample_indices_fn=partial(file_frame_indices, video=video, num_frames=num_frames))
        return frames
    video = np.stack([np.asarray(frame) for frame in video])
    return video[uniform_frame_indices(len(video), num_frames)]


def file_frame_indices(metadata: VideoMetadata, video: str, num_frames: int, **kwargs) -> np.ndarray:
    """`load_video`'s choice of frames: the arrays' even sampling, over the frame count the file records."""
    if metadata.total_num_frames == 0:
        raise ValueError(
            f"{video} records no frame count, which Transformers' PyAV reader needs (Matroska files, for one, do "
            "not); convert it to MP4 or QuickTime, or pass its frames as an array."
        )
    return uniform_frame_indices(metadata.total_num_frames, num_frames)


class FastGPTProcessor(ProcessorMixin):
    # `ProcessorMixin.__call__` hands `videos=` to `_process_videos` when this attribute exists; the frames go
    # through the image processor, so there is no separate video processor to save.
    video_processor = None

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int = 196,
        image_token: str = "<image>",
        video_token: str = "<video>",
        num_frames: int = 8,
        video_tokens_per_frame: int = 49,
        chat_template: str | None = None,
        **kwargs,
    ):
        """image_processor: any Transformers image processor; tokenizer: one that knows `image_token` (and, to read
        videos, `video_token`) as single tokens; num_image_tokens: placeholders per image, the model's
        `config.image_seq_length`; num_frames: frames sampled per video; video_tokens_per_frame: the model's pooled
        patches per frame."""
        if tokenizer is not None and self.token_id(tokenizer, image_token) is None:
            raise ValueError(
                f"The tokenizer has no token {image_token!r}; add it first, e.g. "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})."
            )
        positive = {"num_image_tokens": num_image_tokens, "num_frames": num_frames}
        positive["video_tokens_per_frame"] = video_tokens_per_frame
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        self.image_token_id = None if tokenizer is None else self.token_id(tokenizer, image_token)
        self.num_frames = num_frames
        self.video_tokens_per_frame = video_tokens_per_frame
        self.video_token = video_token
        self.video_token_id = None if tokenizer is None else self.token_id(tokenizer, video_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @staticmethod
    def token_id(tokenizer, token: str) -> int | None:
        """The id of `token` as one token of `tokenizer`, or None when it has none."""
        token_id = tokenizer.convert_tokens_to_ids(token)
        return None if token_id in (None, tokenizer.unk_token_id) else token_id

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text standing for one image: `num_image_tokens` placeholders."""
        return self.image_token * self.num_image_tokens

    def _process_videos(self, videos, num_frames: int | None = None, **kwargs) -> tuple[dict, list[str]]:
        """`pixel_values_videos` `[N, num_frames, C, H, W]` and, per video, the placeholders standing for it.

        `num_frames` overrides the processor's for one call; other video keyword arguments go to the image
        processor, which prepares every frame."""
        if self.video_token_id is None:
            raise ValueError(f"The tokenizer has no token {self.video_token!r}; add it to read videos.")
        num_frames = num_frames or self.num_frames
        sampled = [sample_video(video, num_frames) for video in make_batched_videos(videos)]
        kwargs["return_tensors"] = "pt"
        frames = [frame for video in sampled for frame in video]
        pixel_values = self.image_processor(images=frames, **kwargs)["pixel_values"]
        pixel_values_videos = torch.as_tensor(pixel_values).unflatten(0, (len(sampled), num_frames))
        replacement = self.video_token * (num_frames * self.video_tokens_per_frame)
        return BatchFeature({"pixel_values_videos": pixel_values_videos}), [replacement] * len(sampled)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "pixel_values_videos"]


__all__ = ["FastGPTProcessor"]
