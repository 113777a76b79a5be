"""Image preprocessing: the model directory's own image processor, or CLIP's for the embedded model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from m2pt_fast.compat import CLIPImageProcessorPil, load_image_processor
from m2pt_fast.errors import MissingInput, UserError

# CLIP's normalisation (openai/clip-vit-*): what LLaVA's vision tower was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def as_rgb(image: Image.Image) -> Image.Image:
    """The image as a photo viewer shows it, in 8-bit RGB: turned upright by its EXIF orientation,
    and 16-bit (or 32-bit integer) grey levels scaled down rather than clipped to white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        levels = np.asarray(image, dtype=np.float64)
        # "I;16*" holds 0..65535; a 16-bit PNG may also open as "I" (32-bit ints, the same range)
        scale = 65535.0 if image.mode.startswith("I;16") or levels.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(levels * (255.0 / scale)), 0, 255).astype(np.uint8)  # (H, W)
        image = Image.fromarray(grey)  # mode "L"
    return image.convert("RGB")


# "crop": the processor's resize and centre crop (LLaVA v1, the paper's); "pad": LLaVA-1.5's, the image
# first padded to a square with the processor's mean colour, so nothing is cropped away
ASPECT_RATIOS = ("crop", "pad")


def pad_to_square(image: Image.Image, mean) -> Image.Image:
    """LLaVA-1.5's expand2square: the image centred on a square of the mean colour (0-255 per channel,
    int() of mean x 255), the longer side kept; the extra row or column of an odd difference goes
    after it (bottom or right)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class ImagePreprocessor:
    """PIL image -> (3, S, S) float32 pixel values, via a transformers image processor.

    `from_model_dir` reads the processor config shipped with the model (preprocessor_config.json),
    so resize, crop and mean/std are the ones the vision tower was trained with.
    """

    def __init__(self, processor, image_size: int, aspect_ratio: str = "crop"):
        if aspect_ratio not in ASPECT_RATIOS:
            raise UserError(f"--image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
        self.processor = processor
        self.image_size = image_size
        self.aspect_ratio = aspect_ratio

    @classmethod
    def clip_default(cls, image_size: int, aspect_ratio: str = "crop") -> ImagePreprocessor:
        processor = CLIPImageProcessorPil(  # the PIL one: the plain CLIPImageProcessor wants torchvision
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )
        return cls(processor, image_size, aspect_ratio)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, image_size: int, aspect_ratio: str = "crop") -> ImagePreprocessor:
        config = Path(model_dir) / "preprocessor_config.json"
        if not config.is_file():
            raise MissingInput(
                f"{config} not found: the model directory must carry its image processor config "
                "(save it with processor.save_pretrained(dir) next to the model)"
            )
        return cls(load_image_processor(str(model_dir)), image_size, aspect_ratio)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = as_rgb(image)
        if self.aspect_ratio == "pad":
            image = pad_to_square(image, self.processor.image_mean)
        pixels = self.processor(images=image, return_tensors="pt").pixel_values[0]
        if pixels.shape != (3, self.image_size, self.image_size):
            raise UserError(
                f"the image processor gives {tuple(pixels.shape)} but the vision tower expects "
                f"(3, {self.image_size}, {self.image_size}): fix crop_size in preprocessor_config.json"
            )
        return pixels.float()
