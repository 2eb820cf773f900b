"""Synthetic, visually distinct "characters" for the demo and the tests.

One colour and one shape per class, at a random place and size over a noisy
background: a tiny ResNet learns them in a few epochs, so a demo or a test can
train, label and query end to end on data it makes in seconds.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (240, 200, 30), (160, 60, 200), (30, 200, 210)]
SHAPES = ["ellipse", "rectangle", "triangle", "cross", "ring", "bars"]


def class_image(class_index: int, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy background with one coloured shape that identifies the class."""
    return class_image_and_box(class_index, rng, size)[0]


def class_image_and_box(class_index: int, rng: np.random.Generator, size: int = 48) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """:func:`class_image` and the shape's bounding box (x1, y1, x2, y2), as annotation.csv gives it.

    Characters 0-5 are a colour and a shape each; from 6 on, the colours come round
    again with other shapes (6 is a red rectangle, 7 a green triangle...), so a test
    can have characters that share a colour or a shape with others and are still new.
    """
    bg = rng.integers(60, 140, size=3)
    arr = np.clip(bg + rng.normal(0, 18, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    color = tuple(int(c) for c in np.clip(np.array(PALETTE[class_index % len(PALETTE)]) + rng.integers(-20, 20, 3), 0, 255))
    r = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = SHAPES[(class_index + class_index // len(PALETTE)) % len(SHAPES)]
    if shape == "ellipse":
        draw.ellipse(box, fill=color)
    elif shape == "rectangle":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif shape == "cross":
        draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=color)
        draw.rectangle((cx - r // 3, cy - r, cx + r // 3, cy + r), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, r // 3))
    else:
        for i in range(-r, r, max(3, r // 2)):
            draw.rectangle((cx + i, cy - r, cx + i + max(1, r // 4), cy + r), fill=color)
    return img, (cx - r, cy - r, cx + r + 1, cy + r + 1)


def scene_image(class_indices: list[int], rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A frame of a scene: a noisy background with the given characters side by side (none: an empty scene)."""
    bg = rng.integers(60, 140, size=3)
    frame = np.clip(bg + rng.normal(0, 18, size=(size, size, 3)), 0, 255).astype(np.uint8)
    if not class_indices:
        return Image.fromarray(frame, "RGB")
    slot = size // len(class_indices)
    for i, k in enumerate(class_indices):
        picture, (x1, y1, x2, y2) = class_image_and_box(k, rng, size)
        shape = picture.crop((x1, y1, x2, y2)).resize((min(slot, x2 - x1), min(size, y2 - y1)))
        left = i * slot + (slot - shape.width) // 2
        top = int(rng.integers(0, size - shape.height + 1))
        frame[top : top + shape.height, left : left + shape.width] = np.asarray(shape)
    return Image.fromarray(frame, "RGB")


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_class_folders(root: str, classes: list[str], per_class: int, seed: int = 0, size: int = 48,
                        boxes: bool = False, first_index: int = 0) -> dict[str, int]:
    """Kaggle training layout ``root/<class>/pic_NNNN.jpg``; returns images per class.

    The classes are the synthetic characters ``first_index``, ``first_index + 1``... in
    turn. With ``boxes``, also ``root/annotation.csv`` (``path,x1,y1,x2,y2,character``)
    with every shape's box, as the Kaggle dataset's author gives them.
    """
    rng = np.random.default_rng(seed)
    rows = ["path,x1,y1,x2,y2,character"]
    for k, name in enumerate(classes, start=first_index):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            fmt = "PNG" if i % 5 == 0 else "JPEG"
            ext = "png" if fmt == "PNG" else "jpg"
            img, box = class_image_and_box(k, rng, size)
            with open(os.path.join(folder, f"pic_{i:04d}.{ext}"), "wb") as f:
                f.write(encode(img, fmt))
            rows.append(f"{name}/pic_{i:04d}.{ext},{','.join(str(v) for v in box)},{name}")
    if boxes:
        with open(os.path.join(root, "annotation.csv"), "w") as f:
            f.write("\n".join(rows) + "\n")
    return {name: per_class for name in classes}


def write_tar(path: str, members: dict[str, bytes], gz: bool = False) -> None:
    """A tar (or tar.gz) whose members are the given name -> bytes."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
