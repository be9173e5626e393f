"""FastGPTForConditionalGeneration, FastGPTProcessor and the captioning adapter recipe, on tiny random models."""

import os

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from fastgpt_hf import FastGPTConfig, FastGPTForConditionalGeneration, FastGPTProcessor, FastGPTVLConfig
from fastgpt_hf.multimodal.adapters import captioning_lora_config
from fastgpt_hf.multimodal.word_tokenizer import train_word_tokenizer

CAPTIONS = ["a red square", "a blue circle", "two green triangles", "three red circles"]
PROMPT = "<image>caption:"
VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
}


def tiny_processor() -> FastGPTProcessor:
    tokenizer = train_word_tokenizer(CAPTIONS + [PROMPT])
    image_processor = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    return FastGPTProcessor(image_processor, tokenizer, num_image_tokens=16)


@pytest.fixture(scope="module")
def processor() -> FastGPTProcessor:
    return tiny_processor()


def build_model(processor: FastGPTProcessor, seed: int = 0, **vl_fields) -> FastGPTForConditionalGeneration:
    """Tiny FastGPT (sliding, dynamic, full layers; windows shorter than the prompt) over a tiny SigLIP encoder;
    `vl_fields` add to or replace FastGPTVLConfig fields (the video tests': their encoder, video fields)."""
    torch.manual_seed(seed)
    text_config = FastGPTConfig.from_preset(
        "tiny",
        vocab_size=len(processor.tokenizer),
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.2,
    )
    config = FastGPTVLConfig(
        text_config=text_config,
        image_token_id=processor.image_token_id,
        image_seq_length=processor.num_image_tokens,
        **{"vision_config": VISION_CONFIG, **vl_fields},
    )
    return FastGPTForConditionalGeneration(config).eval()


def pictures(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(count)]


def test_forward_writes_projected_image_features_over_the_placeholders(processor):
    model = build_model(processor)
    inputs = processor(images=pictures(2), text=[PROMPT, "<image>a red"], padding=True, return_tensors="pt")
    logits = model(**inputs).logits

    features = model.get_image_features(inputs["pixel_values"]).pooler_output  # [2, 16, hidden]
    embeddings = model.get_input_embeddings()(inputs["input_ids"]).clone()
    embeddings[inputs["input_ids"] == processor.image_token_id] = features.reshape(-1, features.shape[-1])
    language_model = model.model.language_model
    hidden = language_model(inputs_embeds=embeddings, attention_mask=inputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(logits, model.lm_head(hidden))
    assert isinstance(language_model.config, FastGPTConfig) and not hasattr(language_model.config, "vision_config")
    other_logits = model(**{**inputs, "pixel_values": inputs["pixel_values"].flip(0)}).logits
    assert not torch.allclose(logits[:, -1], other_logits[:, -1])


def test_generate_with_images_matches_the_full_forward_pass(processor):
    model = build_model(processor)
    inputs = processor(images=pictures(2), text=[PROMPT, "<image>a"], padding=True, return_tensors="pt")
    assert inputs["attention_mask"][1, 0] == 0  # the shorter prompt is left padded
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(generated[:, prompt_length:])], dim=1)
    logits = model(input_ids=generated, attention_mask=attention_mask, pixel_values=inputs["pixel_values"]).logits
    new_tokens = generated[:, prompt_length:]
    is_eos = new_tokens == model.config.text_config.eos_token_id
    before_stop = is_eos.long().cumsum(-1) - is_eos.long() == 0  # up to and including the first </s>
    predicted = logits[:, prompt_length - 1 : -1].argmax(-1)
    torch.testing.assert_close(predicted[before_stop], new_tokens[before_stop])


def test_pipeline_captions_like_generate(processor):
    model = build_model(processor)
    image = pictures(1)[0]
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    expected = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    captioner = pipeline("image-text-to-text", model=model, processor=processor)
    result = captioner(images=image, text=PROMPT, generate_kwargs={"max_new_tokens": 5, "do_sample": False})
    assert result[0]["generated_text"].endswith(expected.strip())


def test_auto_classes_round_trip_model_and_processor(processor, tmp_path):
    model = build_model(processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    loaded_model = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded_processor, FastGPTProcessor) and isinstance(loaded_model, FastGPTForConditionalGeneration)
    assert isinstance(loaded_processor.image_processor, SiglipImageProcessorPil)
    assert loaded_processor.num_image_tokens == 16 and loaded_processor.image_token_id == processor.image_token_id
    inputs = processor(images=pictures(1), text=[PROMPT], return_tensors="pt")
    loaded_inputs = loaded_processor(images=pictures(1), text=[PROMPT], return_tensors="pt")
    torch.testing.assert_close(loaded_inputs["pixel_values"], inputs["pixel_values"])
    torch.testing.assert_close(loaded_model(**loaded_inputs).logits, model(**inputs).logits)


def training_batch(processor: FastGPTProcessor) -> dict[str, torch.Tensor]:
    texts = [f"{PROMPT} {caption}</s>" for caption in CAPTIONS]
    batch = processor(images=pictures(len(CAPTIONS)), text=texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[labels == processor.image_token_id] = -100
    return {**batch, "labels": labels}


def train_adapter(processor: FastGPTProcessor, steps: int) -> tuple[PeftModel, list[float]]:
    model = get_peft_model(build_model(processor), captioning_lora_config(rank=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = training_batch(processor), []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_adapter_training_lowers_the_loss_and_trains_only_lora_and_projector(processor):
    reference = build_model(processor)
    model, losses = train_adapter(processor, steps=12)
    assert losses[-1] < 0.25 * losses[0]
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert all("lora_" in name or "multi_modal_projector" in name for name in trainable)
    assert any("language_model.layers.0.mlp.down_proj.lora_A" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)
    vision_tower = model.base_model.model.model.vision_tower
    for name, parameter in reference.model.vision_tower.named_parameters():
        torch.testing.assert_close(vision_tower.get_parameter(name), parameter)


def test_adapter_only_save_load_and_merge_give_the_same_logits(processor, tmp_path):
    model, _ = train_adapter(processor, steps=3)
    inputs = processor(images=pictures(2, seed=1), text=[PROMPT] * 2, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    build_model(processor).save_pretrained(tmp_path / "full")
    adapter_bytes = os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter_bytes < 0.5 * os.path.getsize(tmp_path / "full" / "model.safetensors")

    loaded = PeftModel.from_pretrained(build_model(processor), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected)
        merged = loaded.merge_and_unload()
        assert isinstance(merged, FastGPTForConditionalGeneration)
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_wrong_number_of_images_or_placeholders_is_a_clear_error(processor):
    model = build_model(processor)
    with pytest.raises(ValueError, match="Found total 1 <image> tokens and 2 images"):
        processor(images=pictures(2), text=[PROMPT, "caption:"])
    inputs = processor(images=pictures(2), text=[PROMPT, PROMPT], return_tensors="pt")
    one_placeholder_short = inputs["input_ids"].clone()
    one_placeholder_short[0, 1] = processor.tokenizer.convert_tokens_to_ids("caption")
    with pytest.raises(ValueError, match="31 image placeholder tokens .* 2 images need 32"):
        model(input_ids=one_placeholder_short, pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="32 image placeholder tokens .* 1 images need 16"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1])
    with pytest.raises(ValueError, match="32 image placeholder tokens .* 0 images need 0"):
        model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize(
    "pixel_values",
    [torch.zeros(2, 3, 32, 32), torch.zeros(2, 1, 16, 16), torch.zeros(3, 16, 16), [[0.0]]],
    ids=["larger-images", "one-channel", "no-batch-dim", "list"],
)
def test_pixel_values_the_encoder_cannot_read_are_a_clear_error(processor, pixel_values):
    model = build_model(processor)
    inputs = processor(images=pictures(2), text=[PROMPT, PROMPT], return_tensors="pt")
    with pytest.raises(ValueError, match=r"pixel_values must be a tensor \[images, 3, 16, 16\]"):
        model(input_ids=inputs["input_ids"], pixel_values=pixel_values)


# A malformed text input of the two-image prompt (ids and mask (2, 19)) and its error.
MALFORMED_TEXT_INPUTS = {
    "ids-1d": r"input_ids must be token ids of shape \(batch, tokens\) .* got shape \(19,\)",
    "ids-float": r"input_ids must be token ids .* got shape \(2, 19\) and dtype torch.float32",
    "mask-shorter": r"attention_mask must have shape \(batch, cached \+ new tokens\) = \(2, 19\), .* \(2, 18\)",
    "zero-rows": r"input_ids has shape \(0, 19\), an empty input",
}


@pytest.mark.parametrize("malformed", list(MALFORMED_TEXT_INPUTS))
@pytest.mark.parametrize("entry_point", ["forward", "generate"])
def test_malformed_text_inputs_of_the_captioning_model_are_refused(processor, entry_point, malformed):
    """The captioning model checks the ids and mask it forwards to the language model as FastGPTModel does."""
    model = build_model(processor)
    inputs = processor(images=pictures(2), text=[PROMPT, PROMPT], return_tensors="pt")
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    inputs.update(
        {
            "ids-1d": {"input_ids": input_ids[0]},
            "ids-float": {"input_ids": input_ids.float()},
            "mask-shorter": {"attention_mask": attention_mask[:, 1:]},
            "zero-rows": {"input_ids": input_ids[:0], "attention_mask": attention_mask[:0]},
        }[malformed]
    )
    with pytest.raises(ValueError, match=MALFORMED_TEXT_INPUTS[malformed]):
        if entry_point == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_configuration_and_processor_errors(processor):
    text_config = FastGPTConfig.from_preset("tiny")
    with pytest.raises(ValueError, match=r"vision_feature_layer \(99\) must index the vision encoder's 3 hidden"):
        FastGPTVLConfig(text_config=text_config, vision_config=VISION_CONFIG, vision_feature_layer=99)
    with pytest.raises(ValueError, match=r"projector_hidden_act 'nope' is not one of Transformers' activations"):
        FastGPTVLConfig(text_config=text_config, vision_config=VISION_CONFIG, projector_hidden_act="nope")
    with pytest.raises(ValueError, match="image_token_id \\(500\\)"):
        FastGPTVLConfig(text_config=text_config, vision_config=VISION_CONFIG, image_token_id=500)
    with pytest.raises(ValueError, match="features per image but config.image_seq_length is 9"):
        config = FastGPTVLConfig(text_config=text_config, vision_config=VISION_CONFIG, image_seq_length=9)
        FastGPTForConditionalGeneration(config)(
            input_ids=torch.full((1, 9), config.image_token_id), pixel_values=torch.zeros(1, 3, 16, 16)
        )
    with pytest.raises(ValueError, match="has no token '<frame>'"):
        FastGPTProcessor(processor.image_processor, processor.tokenizer, image_token="<frame>")


def test_token_ids_outside_the_vocabulary_are_refused(processor):
    model = build_model(processor)
    inputs = processor(images=pictures(1), text=[PROMPT], return_tensors="pt")
    vocab_size = model.config.text_config.vocab_size
    inputs["input_ids"][0, -1] = vocab_size
    with pytest.raises(ValueError, match=rf"token id {vocab_size}, outside .* \[0, {vocab_size}\)"):
        model(**inputs)
