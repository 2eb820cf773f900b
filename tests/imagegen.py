"""Small real images the tests build themselves: visually distinct classes, bad files."""

from __future__ import annotations

import io
import os
import socket
import tarfile

import numpy as np
from PIL import Image, ImageDraw

# One colour and one shape per class; distinct enough that a tiny ResNet learns
# them in a few epochs, varied enough (position, size, noise) not to be a lookup.
PALETTE = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (240, 200, 30), (160, 60, 200), (30, 200, 210)]
SHAPES = ["ellipse", "rectangle", "triangle", "cross", "ring", "bars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def class_image(class_index: int, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy background with one coloured shape that identifies the class."""
    bg = rng.integers(60, 140, size=3)
    arr = np.clip(bg + rng.normal(0, 18, size=(size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    color = tuple(int(c) for c in np.clip(np.array(PALETTE[class_index % len(PALETTE)]) + rng.integers(-20, 20, 3), 0, 255))
    r = int(size * rng.uniform(0.25, 0.4))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    shape = SHAPES[class_index % len(SHAPES)]
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
    return img


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_class_folders(root: str, classes: list[str], per_class: int, seed: int = 0, size: int = 48) -> dict[str, int]:
    """Kaggle training layout ``root/<class>/pic_NNNN.jpg``; returns images per class."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            fmt = "PNG" if i % 5 == 0 else "JPEG"
            ext = "png" if fmt == "PNG" else "jpg"
            with open(os.path.join(folder, f"pic_{i:04d}.{ext}"), "wb") as f:
                f.write(encode(class_image(k, rng, size), fmt))
    return {name: per_class for name in classes}


def write_flat_test_folder(root: str, classes: list[str], per_class: int, seed: int = 1, size: int = 48) -> None:
    """Kaggle test layout: one flat folder of ``<character>_<N>.jpg``."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for k, name in enumerate(classes):
        for i in range(per_class):
            with open(os.path.join(root, f"{name}_{i}.jpg"), "wb") as f:
                f.write(encode(class_image(k, rng, size)))


def write_tar(path: str, members: dict[str, bytes], gz: bool = False) -> None:
    """A tar (or tar.gz) whose members are the given name -> bytes."""
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def upload_tree(client, bucket: str, local_root: str, prefix: str) -> str:
    """Copy a local folder to ``s3://bucket/prefix``; returns that URI."""
    for dirpath, _, files in os.walk(local_root):
        for name in files:
            full = os.path.join(dirpath, name)
            key = f"{prefix}/{os.path.relpath(full, local_root)}".replace(os.sep, "/")
            client.upload_file(full, bucket, key)
    return f"s3://{bucket}/{prefix}"
