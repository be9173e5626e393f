"""Video input to FastGPTForConditionalGeneration: frame sampling, pooled frame tokens, mixed batches, adapters."""

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from PIL import Image
from transformers import AutoProcessor
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from fastgpt_hf import FastGPTConfig, FastGPTForConditionalGeneration, FastGPTProcessor, FastGPTVLConfig
from fastgpt_hf.modeling_fastgpt_vl import pool_frame_patches
from fastgpt_hf.multimodal.adapters import video_lora_config
from fastgpt_hf.multimodal.word_tokenizer import train_word_tokenizer
from fastgpt_hf.processing_fastgpt_vl import uniform_frame_indices

from .test_multimodal import VISION_CONFIG
from .test_multimodal import build_model as image_captioner

CAPTIONS = ["a red square moves left", "a blue circle moves right", "a green square appears", "a red circle vanishes"]
PROMPT = "<video>caption:"
NUM_FRAMES = 3
TOKENS_PER_FRAME = 4  # a 4 x 4 patch grid pooled by 2


@pytest.fixture(scope="module")
def processor() -> FastGPTProcessor:
    tokenizer = train_word_tokenizer(CAPTIONS + [PROMPT], extra_special_tokens=("<video>",))
    image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    return FastGPTProcessor(
        image_processor, tokenizer, num_image_tokens=16, num_frames=NUM_FRAMES, video_tokens_per_frame=TOKENS_PER_FRAME
    )


def build_model(processor: FastGPTProcessor, seed: int = 0) -> FastGPTForConditionalGeneration:
    """The image tests' tiny captioner with a one-layer encoder, reading videos: frames pooled by 2."""
    return image_captioner(
        processor,
        seed,
        vision_config={**VISION_CONFIG, "num_hidden_layers": 1},
        video_token_id=processor.video_token_id,
        video_pool_size=2,
    )


def clips(count: int, num_frames: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (num_frames, 20, 24, 3), dtype=np.uint8) for _ in range(count)]


def test_frames_are_sampled_evenly_from_arrays_and_pil_frames(processor):
    assert uniform_frame_indices(6, 3).tolist() == [0, 2, 5]
    clip = clips(1)[0]
    from_array = processor(videos=[clip], text=[PROMPT], return_tensors="pt")
    from_frames = processor(videos=[[Image.fromarray(frame) for frame in clip]], text=[PROMPT], return_tensors="pt")
    assert from_array["pixel_values_videos"].shape == (1, NUM_FRAMES, 3, 16, 16)
    torch.testing.assert_close(from_array["pixel_values_videos"], from_frames["pixel_values_videos"])
    middle = processor(images=[Image.fromarray(clip[2])], text=["<image>"], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_array["pixel_values_videos"][0, 1], middle[0])
    num_placeholders = int((from_array["input_ids"] == processor.video_token_id).sum())
    assert num_placeholders == NUM_FRAMES * TOKENS_PER_FRAME
    four_frames = processor(videos=[clip], text=[PROMPT], num_frames=4, return_tensors="pt")
    assert four_frames["pixel_values_videos"].shape[1] == 4


def write_lossless_video(path, frames: np.ndarray, codec: str = "png") -> None:
    """`[F, H, W, 3]` uint8 frames as a lossless video file through PyAV: PNG frames (QuickTime) or FFV1 (Matroska)."""
    av = pytest.importorskip("av", reason="PyAV (the dev extra) decodes video files")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if codec == "png" else "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_a_video_file_gives_the_frames_of_its_array(processor, tmp_path):
    clip = clips(1)[0]
    write_lossless_video(tmp_path / "clip.mov", clip)
    from_file = processor(videos=[str(tmp_path / "clip.mov")], text=[PROMPT], return_tensors="pt")
    from_array = processor(videos=[clip], text=[PROMPT], return_tensors="pt")
    torch.testing.assert_close(from_file["pixel_values_videos"], from_array["pixel_values_videos"], rtol=0, atol=0)
    assert torch.equal(from_file["input_ids"], from_array["input_ids"])


def test_unreadable_video_files_are_clear_errors(processor, tmp_path):
    with pytest.raises(ValueError, match="No video file at"):
        processor(videos=[str(tmp_path / "missing.mp4")], text=[PROMPT])
    write_lossless_video(tmp_path / "clip.mkv", clips(1)[0], codec="ffv1")
    with pytest.raises(ValueError, match="records no frame count"):
        processor(videos=[str(tmp_path / "clip.mkv")], text=[PROMPT])


def test_video_features_pool_each_frame_and_mark_its_order(processor):
    model = build_model(processor)
    pixel_values_videos = processor(videos=clips(2), text=[PROMPT] * 2, return_tensors="pt")["pixel_values_videos"]
    assert model.config.video_tokens_per_frame == TOKENS_PER_FRAME
    default = FastGPTVLConfig(text_config=FastGPTConfig(), video_token_id=5)  # SigLIP-base 224 / 16, 32K positions
    assert (default.video_tokens_per_frame, default.max_frames_in_context(prompt_tokens=16)) == (49, 668)
    features = model.get_video_features(pixel_values_videos).pooler_output
    assert features.shape == (2, NUM_FRAMES * TOKENS_PER_FRAME, model.config.text_config.hidden_size)
    patches = model.model.select_vision_features(pixel_values_videos[1])[1]  # the frames of video 1 as images
    projected = model.model.multi_modal_projector(pool_frame_patches(patches, 2))  # [F, tokens, hidden]
    expected = projected + model.model.video_frame_embedding.weight[:NUM_FRAMES, None]
    torch.testing.assert_close(features[1], expected.flatten(0, 1))
    grid = torch.arange(16.0).reshape(1, 16, 1)  # one 4 x 4 grid, patch value = its index
    assert pool_frame_patches(grid, 2).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_generate_with_a_video_and_a_mixed_image_video_batch(processor):
    model = build_model(processor)
    image = Image.fromarray(clips(1, seed=3)[0][0])
    inputs = processor(
        images=[image], videos=clips(1), text=[PROMPT, "<image>caption:"], padding=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(generated[:, prompt_length:])], dim=1)
    logits = model(**{**inputs, "input_ids": generated, "attention_mask": attention_mask}).logits
    new_tokens = generated[:, prompt_length:]
    is_eos = new_tokens == model.config.text_config.eos_token_id
    before_stop = is_eos.long().cumsum(-1) - is_eos.long() == 0
    torch.testing.assert_close(logits[:, prompt_length - 1 : -1].argmax(-1)[before_stop], new_tokens[before_stop])
    alone = processor(videos=clips(1), text=[PROMPT], return_tensors="pt")
    alone_logits = model(**alone).logits[0, -1]
    torch.testing.assert_close(model(**inputs).logits[0, -1], alone_logits, atol=1e-5, rtol=1e-5)


def test_wrong_frame_or_placeholder_counts_are_clear_errors(processor):
    model = build_model(processor)
    with pytest.raises(ValueError, match="2 frames, fewer than num_frames=3"):
        processor(videos=clips(1, num_frames=2), text=[PROMPT])
    with pytest.raises(ValueError, match="Found total 2 <video> tokens and 1 videos"):
        processor(videos=clips(1), text=[PROMPT + PROMPT])
    inputs = processor(videos=clips(1), text=[PROMPT], return_tensors="pt")
    one_frame_short = inputs["pixel_values_videos"][:, :2]
    with pytest.raises(ValueError, match="12 video placeholder tokens .* 1 videos need 8 \\(8 per video\\)"):
        model(input_ids=inputs["input_ids"], pixel_values_videos=one_frame_short)
    with pytest.raises(ValueError, match="12 video placeholder tokens .* 0 videos need 0"):
        model(input_ids=inputs["input_ids"])
    too_long = inputs["pixel_values_videos"][:, :1].expand(-1, model.config.max_video_frames + 1, -1, -1, -1)
    with pytest.raises(ValueError, match="more than config.max_video_frames=1024"):
        model.get_video_features(too_long)


def test_processor_round_trip_keeps_the_video_settings(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert (loaded.num_frames, loaded.video_tokens_per_frame) == (NUM_FRAMES, TOKENS_PER_FRAME)
    assert loaded.video_token_id == processor.video_token_id
    expected = processor(videos=clips(1), text=[PROMPT], return_tensors="pt")
    actual = loaded(videos=clips(1), text=[PROMPT], return_tensors="pt")
    torch.testing.assert_close(actual["pixel_values_videos"], expected["pixel_values_videos"])
    torch.testing.assert_close(actual["input_ids"], expected["input_ids"])


def test_video_adapter_trains_saves_and_loads_apart_from_the_image_adapter(processor, tmp_path):
    model = get_peft_model(build_model(processor), video_lora_config(rank=4))
    texts = [f"{PROMPT} {caption}</s>" for caption in CAPTIONS]
    batch = processor(videos=clips(len(CAPTIONS)), text=texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[labels == processor.video_token_id] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]
    model.eval()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert any("video_frame_embedding" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "video")
    loaded = PeftModel.from_pretrained(build_model(processor), tmp_path / "video", adapter_name="video").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected)
        loaded.set_adapter("video")
        loaded.disable_adapter_layers()
        assert not torch.allclose(loaded(**batch).logits, expected)
