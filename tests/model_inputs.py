"""Inputs shared by the model tests (tiny shapes: the image token is 127)."""
import torch

IMAGE_TOKEN = 127


def make_batch(model, batch=2, text_before=3, text_after=9, seed=0, images=True):
    """Random ids with one image's worth of image tokens per row, labels on the text after the image."""
    g = torch.Generator().manual_seed(seed)
    s = model.image_seq_length if images else 0
    ids = torch.randint(1, IMAGE_TOKEN, (batch, text_before + s + text_after), generator=g)
    ids[:, text_before:text_before + s] = IMAGE_TOKEN
    labels = ids.clone()
    labels[:, :text_before + s] = -100
    pixels = torch.randn(batch, 3, model.image_size, model.image_size, generator=g) if images else None
    return ids, pixels, labels
