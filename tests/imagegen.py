"""Small real images the tests build themselves: visually distinct classes, bad files."""

from __future__ import annotations

import os
import socket
from fractions import Fraction

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


def write_video(path: str, pictures, fps: int = 12, size: tuple[int, int] = (160, 120), pts: list[int] | None = None,
                time_base: Fraction | None = None, gop: int = 12) -> None:
    """An H.264 video (the container from the file name: .mp4, .mkv, ...) of the given PIL pictures, one per frame.

    ``pts`` with ``time_base`` gives each frame its own presentation time (a variable
    frame rate); without them frame i is shown at i / fps. A keyframe every ``gop`` frames.
    """
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "ultrafast", "bf": "0"}
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        for i, picture in enumerate(pictures):
            frame = av.VideoFrame.from_image(picture.convert("RGB").resize(size))
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base or Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_audio_only(path: str, seconds: float = 1.0) -> None:
    """An AAC file with no video stream."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=44100)
        for _ in range(int(seconds * 44100 / 1024)):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 44100
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


SHAPE_CLASSES = ["bart", "homer", "lisa", "marge"]
SHAPE_MODEL_PX = 32
SHAPE_FRAME_PX = 44  # frames are bigger than the model input, so resizing is exercised


def train_shapes_model(path: str) -> str:
    """A resnet18 artifact at 32 px whose head is trained, on frozen random features, to tell 4 shapes apart.

    Training only the head on features computed once takes a second and still gives
    confident, class-dependent predictions, which is all the labeling tests need.
    """
    import torch

    from simpsons_ray.model import build_model, save_artifact
    from simpsons_ray.preprocess import PreprocessConfig, load_resized, normalize

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = PreprocessConfig(image_size=SHAPE_MODEL_PX)
    n = 96
    images = [load_resized(encode(class_image(i % len(SHAPE_CLASSES), rng, SHAPE_FRAME_PX)), SHAPE_MODEL_PX) for i in range(n)]
    x, y = normalize(np.stack(images), config), torch.arange(n) % len(SHAPE_CLASSES)
    model = build_model("resnet18", len(SHAPE_CLASSES), head_hidden=64, dropout=0.0).eval()
    head, model.fc = model.fc, torch.nn.Identity()
    with torch.inference_mode():
        features = model(x)
    model.fc = head
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features.clone()), y).backward()
        optimizer.step()
    with torch.inference_mode():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, f"the shapes model did not learn the shapes (train accuracy {accuracy:.2f})"
    save_artifact(path, model, "resnet18", SHAPE_CLASSES, config, head_hidden=64, dropout=0.0)
    return path
