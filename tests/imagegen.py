"""Small real images the tests build themselves: visually distinct classes, bad files."""

from __future__ import annotations

import os
import socket

import numpy as np

from simpsons_ray.synthetic import PALETTE, SHAPES, class_image, encode, write_class_folders, write_tar  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_flat_test_folder(root: str, classes: list[str], per_class: int, seed: int = 1, size: int = 48) -> None:
    """Kaggle test layout: one flat folder of ``<character>_<N>.jpg``."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for k, name in enumerate(classes):
        for i in range(per_class):
            with open(os.path.join(root, f"{name}_{i}.jpg"), "wb") as f:
                f.write(encode(class_image(k, rng, size)))


def upload_tree(client, bucket: str, local_root: str, prefix: str) -> str:
    """Copy a local folder to ``s3://bucket/prefix``; returns that URI."""
    for dirpath, _, files in os.walk(local_root):
        for name in files:
            full = os.path.join(dirpath, name)
            key = f"{prefix}/{os.path.relpath(full, local_root)}".replace(os.sep, "/")
            client.upload_file(full, bucket, key)
    return f"s3://{bucket}/{prefix}"
