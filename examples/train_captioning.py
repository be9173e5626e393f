"""Train FastGPT to caption images through adapters, on pictures drawn on the fly with PIL; report held-out accuracy.

Each 32 x 32 picture holds one to three shapes of one colour, one per quadrant. Its caption names the count, colour
and shape, and for a single shape its quadrant: "a red square at the top left", "three blue circles". The pictures
go through `datasets` with the `Image` feature and a held-out split. The model is a `FastGPTForConditionalGeneration`
over a random SigLIP-style vision encoder (frozen: no weights can be downloaded) and a small FastGPT; training uses
the adapter recipe (`captioning_lora_config`: LoRA on the language model, the projector in full). At the end the
script greedily captions the held-out pictures and prints exact-match and word accuracy against two baselines
(uniform guessing over the caption grammar, and always answering the most frequent training caption), the adapter's
file size against the full model's, the logit gap after `merge_and_unload`, and one caption through
`pipeline("image-text-to-text")`.

    python examples/train_captioning.py --minutes 4
"""

import argparse
import os
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from peft import get_peft_model
from PIL import Image, ImageDraw
from transformers import pipeline
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from fastgpt_hf import FastGPTConfig, FastGPTForConditionalGeneration, FastGPTProcessor, FastGPTVLConfig
from fastgpt_hf.multimodal.adapters import captioning_lora_config
from fastgpt_hf.multimodal.word_tokenizer import train_word_tokenizer

IMAGE_SIZE = 32
PATCH_SIZE = 8
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
QUADRANTS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}
COUNT_WORDS = {2: "two", 3: "three"}
PROMPT = "<image>caption:"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, quadrant: tuple[int, int], colour, rng) -> None:
    """One shape of 8 to 12 pixels, jittered inside its 16 x 16 quadrant."""
    size = int(rng.integers(8, 13))
    top = quadrant[0] * 16 + int(rng.integers(1, 16 - size))
    left = quadrant[1] * 16 + int(rng.integers(1, 16 - size))
    box = (left, top, left + size, top + size)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(left, top + size), (left + size, top + size), (left + size // 2, top)], fill=colour)


def draw_scene(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A picture with its caption."""
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    count = int(rng.integers(1, 4))
    quadrant_indices = rng.choice(len(QUADRANTS), size=count, replace=False)
    quadrants = [list(QUADRANTS)[index] for index in quadrant_indices]
    background = tuple(int(value) for value in rng.integers(0, 60, size=3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for quadrant in quadrants:
        draw_shape(draw, shape, quadrant, COLOURS[colour], rng)
    if count == 1:
        return image, f"a {colour} {shape} at the {QUADRANTS[quadrants[0]]}"
    return image, f"{COUNT_WORDS[count]} {colour} {shape}s"


def all_captions() -> list[str]:
    """Every caption the grammar can produce (uniform guessing picks among these)."""
    captions = []
    for colour in COLOURS:
        for shape in SHAPES:
            captions += [f"a {colour} {shape} at the {where}" for where in QUADRANTS.values()]
            captions += [f"{word} {colour} {shape}s" for word in COUNT_WORDS.values()]
    return captions


def build_dataset(num_pictures: int, held_out: int, seed: int) -> dict[str, Dataset]:
    rng = np.random.default_rng(seed)
    images, captions = zip(*(draw_scene(rng) for _ in range(num_pictures)), strict=True)
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    dataset = Dataset.from_dict({"image": list(images), "caption": list(captions)}, features=features)
    return dataset.train_test_split(test_size=held_out, seed=seed)


def build_model(
    processor: FastGPTProcessor, seed: int, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE, **vl_fields
) -> FastGPTForConditionalGeneration:
    """A small random captioner; `vl_fields` are further `FastGPTVLConfig` fields (the video example's)."""
    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    text_config = FastGPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
        dynamic_window=16,
        num_memory_tokens=4,
        compress_block_size=4,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision_config = {
        "model_type": "siglip_vision_model",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    config = FastGPTVLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=processor.image_token_id,
        **{"image_seq_length": processor.num_image_tokens, **vl_fields},
    )
    return FastGPTForConditionalGeneration(config)


def caption_batches(processor: FastGPTProcessor, split: Dataset, with_images: bool) -> dict[str, torch.Tensor]:
    """The whole split as tensors, left padded: `[prompt] caption </s>` with labels on the caption and `</s>` only.

    With images the prompt is `PROMPT` (the picture's placeholders and "caption:"); without, the text alone is the
    language model's pretraining data.
    """
    prompt = PROMPT if with_images else ""
    texts = [f"{prompt} {caption}</s>" for caption in split["caption"]]
    images = list(split["image"]) if with_images else None
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    prompt_length = len(processor(images=images[:1] if with_images else None, text=[prompt])["input_ids"][0])
    labels = batch["input_ids"].clone()
    first_caption_token = labels.shape[1] - batch["attention_mask"].sum(-1) + prompt_length  # [N]
    labels[torch.arange(labels.shape[1])[None] < first_caption_token[:, None]] = -100
    return {**batch, "labels": labels}


def train(
    model,
    batches: dict[str, torch.Tensor],
    minutes: float,
    batch_size: int,
    lr: float,
    name: str,
    max_steps: int | None = None,
) -> int:
    """AdamW on the trainable parameters over shuffled rows of `batches` for `minutes` of wall-clock time or
    `max_steps` steps, whichever ends first; returns the number of steps taken."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    num_rows = len(batches["input_ids"])
    model.train()
    started, step = time.monotonic(), 0
    while time.monotonic() - started < minutes * 60 and (max_steps is None or step < max_steps):
        rows = torch.randint(0, num_rows, (batch_size,))
        loss = model(**{key: value[rows] for key, value in batches.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if step % 25 == 0:
            print(f"{name} step {step:5d}  loss {loss.item():.4f}  {time.monotonic() - started:.0f} s", flush=True)
    model.eval()
    return step


@torch.no_grad()
def caption(model, processor: FastGPTProcessor, images: list, batch_size: int = 64) -> list[str]:
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs = processor(images=chunk, text=[PROMPT] * len(chunk), return_tensors="pt", padding=True)
        generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        captions += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return captions


def accuracy(predictions: list[str], references: list[str]) -> tuple[float, float]:
    """Exact match, and word accuracy: reference words matched at their position, over all reference words."""
    exact = sum(p.split() == r.split() for p, r in zip(predictions, references, strict=True)) / len(references)
    matched = sum(
        sum(pw == rw for pw, rw in zip(p.split(), r.split(), strict=False))
        for p, r in zip(predictions, references, strict=True)
    )
    return exact, matched / sum(len(r.split()) for r in references)


def uniform_baseline(references: list[str]) -> tuple[float, float]:
    """Expected exact match and word accuracy of a caption drawn uniformly from the grammar."""
    grammar = all_captions()
    scores = [accuracy([guess] * len(references), references) for guess in grammar]
    return float(np.mean([s[0] for s in scores])), float(np.mean([s[1] for s in scores]))


def file_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget of the adapter training")
    parser.add_argument("--text-minutes", type=float, default=1.0, help="language-model pretraining on the captions")
    parser.add_argument("--pictures", type=int, default=6000, help="pictures drawn, held-out split included")
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate of the text pretraining")
    parser.add_argument("--adapter-lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    splits = build_dataset(args.pictures, args.held_out, args.seed)
    tokenizer = train_word_tokenizer(all_captions() + [PROMPT])
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = FastGPTProcessor(image_processor, tokenizer, num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    model = build_model(processor, args.seed)
    # The adapter recipe adapts a language model that already writes the language: a random one first learns the
    # captions' text (no pictures), in full; the vision encoder stays random and frozen throughout.
    model.model.vision_tower.requires_grad_(False)
    text_batches = caption_batches(processor, splits["train"], with_images=False)
    train(model, text_batches, args.text_minutes, args.batch_size, args.lr, "text pretraining")
    model = get_peft_model(model, captioning_lora_config(rank=args.rank))
    model.print_trainable_parameters()
    image_batches = caption_batches(processor, splits["train"], with_images=True)
    train(model, image_batches, args.minutes, args.batch_size, args.adapter_lr, "adapters")

    held_out = splits["test"]
    predictions = caption(model, processor, list(held_out["image"]))
    references = list(held_out["caption"])
    exact, words = accuracy(predictions, references)
    uniform_exact, uniform_words = uniform_baseline(references)
    majority = Counter(splits["train"]["caption"]).most_common(1)[0][0]
    majority_exact, majority_words = accuracy([majority] * len(references), references)
    print(f"held-out pictures: {len(references)}")
    print(f"model             exact match {exact:.3f}  word accuracy {words:.3f}")
    print(f"uniform guess     exact match {uniform_exact:.3f}  word accuracy {uniform_words:.3f}")
    print(f"majority caption  exact match {majority_exact:.3f}  word accuracy {majority_words:.3f}  ({majority!r})")
    for prediction, reference in list(zip(predictions, references, strict=True))[:5]:
        print(f"  predicted {prediction!r:40} reference {reference!r}")

    with tempfile.TemporaryDirectory() as adapter_dir, tempfile.TemporaryDirectory() as full_dir:
        model.save_pretrained(adapter_dir)
        inputs = processor(images=list(held_out["image"])[:8], text=[PROMPT] * 8, return_tensors="pt")
        adapter_logits = model(**inputs).logits
        merged = model.merge_and_unload()
        merge_gap = (merged(**inputs).logits - adapter_logits).abs().max().item()
        merged.save_pretrained(full_dir)
        print(f"adapter files {file_bytes(adapter_dir):,} bytes; full model files {file_bytes(full_dir):,} bytes")
        print(f"merge_and_unload: max |logit difference| {merge_gap:.2e}")

    captioner = pipeline("image-text-to-text", model=merged, processor=processor)
    result = captioner(images=list(held_out["image"])[0], text=PROMPT, generate_kwargs={"max_new_tokens": 10})
    print(f"pipeline: {result[0]['generated_text']!r} (reference {references[0]!r})")


if __name__ == "__main__":
    main()
