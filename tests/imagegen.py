"""Small real images the tests build themselves: visually distinct classes, bad files."""

from __future__ import annotations

import os
import socket
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw

from simpsons_ray.demo.synthetic import PALETTE, SHAPES, class_image, encode, write_class_folders, write_tar  # noqa: F401


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


def fit_head(model, inputs: list, targets, loss, steps: int) -> list:
    """Train only ``model.fc`` (Adam, lr 1e-2) on the frozen features of ``inputs[0]``; returns every input's features.

    The backbone runs once per input: a second to fit a head that the labeling
    tests can rely on.
    """
    import torch

    head, model.fc = model.fc, torch.nn.Identity()
    with torch.inference_mode():
        features = [model(x) for x in inputs]
    model.fc = head
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(head(features[0].clone()), targets).backward()
        optimizer.step()
    return features


def train_shapes_model(path: str) -> str:
    """A resnet18 artifact at 32 px whose head is trained, on frozen random features, to tell 4 shapes apart.

    Training only the head on features computed once takes a second and still gives
    confident, class-dependent predictions, which is all the labeling tests need.
    """
    import torch

    from simpsons_ray.model.artifact import save_artifact
    from simpsons_ray.model.network import build_model
    from simpsons_ray.model.preprocess import PreprocessConfig, load_resized, normalize

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = PreprocessConfig(image_size=SHAPE_MODEL_PX)
    n = 96
    images = [load_resized(encode(class_image(i % len(SHAPE_CLASSES), rng, SHAPE_FRAME_PX)), SHAPE_MODEL_PX) for i in range(n)]
    x, y = normalize(np.stack(images), config), torch.arange(n) % len(SHAPE_CLASSES)
    model = build_model("resnet18", len(SHAPE_CLASSES), head_hidden=64, dropout=0.0).eval()
    fit_head(model, [x], y, torch.nn.functional.cross_entropy, steps=100)
    with torch.inference_mode():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, f"the shapes model did not learn the shapes (train accuracy {accuracy:.2f})"
    save_artifact(path, model, "resnet18", SHAPE_CLASSES, config, head_hidden=64, dropout=0.0)
    return path


MULTI_MODEL_PX = 32
MULTI_FRAME_PX = 48
CELLS = 4  # a multi-label frame is a 2 x 2 grid of cells, each empty or holding one character


def characters_frame(characters: list[int], rng: np.random.Generator, cells: list[int] | None = None,
                     radius: float | None = None, size: int = MULTI_FRAME_PX) -> Image.Image:
    """A frame holding each of ``characters`` (class indices) as a disc of its PALETTE colour, one per cell.

    ``cells`` (0-3, row by row) say where, else random cells; ``radius`` is a
    fraction of the frame, else random. The background is grey noise: the random
    tints of class_image's backgrounds can look like a character's colour (a
    greenish one like homer's), which a frame that may hold nobody cannot afford.
    """
    cells = list(rng.choice(CELLS, size=len(characters), replace=False)) if cells is None else cells
    grey = int(rng.integers(70, 130))
    img = Image.fromarray(np.clip(grey + rng.normal(0, 18, size=(size, size, 3)), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    half = size // 2
    for k, cell in zip(characters, cells):
        colour = tuple(int(c) for c in np.clip(np.array(PALETTE[k]) + rng.integers(-20, 20, 3), 0, 255))
        r = int(size * (rng.uniform(0.19, 0.23) if radius is None else radius))
        cx, cy = (cell % 2) * half + half // 2, (cell // 2) * half + half // 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return img


def _pool_colour_detectors(model) -> None:
    """Set a resnet18's frozen weights so that its pooled features say how much of the frame has which colour.

    conv1 becomes 64 random colour directions, flat over its 7 x 7 window (pixel
    noise averages out), with random biases, so each ReLU fires on its own region
    of colour space. The first block of each stage averages 2 x 2 at stride 2 and
    the others pass their input on, so the global pool weighs every pixel alike
    and a disc counts the same in any cell. Plain random ResNet features, as in
    train_shapes_model, named the exact set of only 90-97% of held-out frames of
    two small shapes: too few for a test that checks each frame's set.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        directions = torch.nn.functional.normalize(torch.randn(64, 3, generator=g), dim=1)
        model.conv1.weight.copy_((directions / 49)[:, :, None, None].expand(64, 3, 7, 7))
        model.bn1.bias.copy_(-(0.3 + 1.2 * torch.rand(64, generator=g)))
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            for block in stage:
                out = torch.arange(block.conv1.out_channels)
                block.conv1.weight.zero_()
                block.conv2.weight.zero_()
                if block.downsample is not None:  # the stage's first block: a 2 x 2 average, stride 2 (each pixel counted once)
                    block.conv1.weight[out, out % block.conv1.in_channels, 1:, 1:] = 1 / 4
                    block.conv2.weight[out, out, 1, 1] = 1.0
                    block.downsample[1].weight.zero_()


def train_multilabel_shapes_model(path: str, temperature: float = 2.0) -> str:
    """A multi-label resnet18 artifact at 32 px: a sigmoid per character (SHAPE_CLASSES), for frames of 0, 1 or 2 of them.

    As train_shapes_model, only the head is trained, on features computed once
    from a frozen backbone (see _pool_colour_detectors), here with binary
    cross-entropy on characters_frame frames. Saved as `simpsons-ray train
    --objective multilabel` saves: the temperature, and per-character thresholds
    chosen on validation frames (multilabel.choose_thresholds) on the tempered scores.
    """
    import torch

    from simpsons_ray.model import multilabel
    from simpsons_ray.model.artifact import save_artifact
    from simpsons_ray.model.network import build_model
    from simpsons_ray.model.preprocess import PreprocessConfig, load_resized, normalize

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    config = PreprocessConfig(image_size=MULTI_MODEL_PX)
    classes = len(SHAPE_CLASSES)

    def frames(n: int, counts: tuple[int, ...]):
        images, targets = [], np.zeros((n, classes), np.float32)
        for i in range(n):
            present = [int(k) for k in rng.choice(classes, size=counts[i % len(counts)], replace=False)]
            images.append(load_resized(encode(characters_frame(present, rng)), MULTI_MODEL_PX))
            targets[i, present] = 1.0
        return normalize(np.stack(images), config), torch.from_numpy(targets)

    # Pairs are where the characters get confused: half the training frames hold two.
    x, y = frames(512, (0, 1, 1, 2, 2, 2))
    val_x, val_y = frames(256, (0, 1, 2))
    model = build_model("resnet18", classes, head_hidden=64, dropout=0.0).eval()
    _pool_colour_detectors(model)
    _, val_features = fit_head(model, [x, val_x], y, torch.nn.functional.binary_cross_entropy_with_logits, steps=500)
    with torch.inference_mode():
        val_scores = multilabel.sigmoid(model.fc(val_features).numpy(), temperature)
    thresholds = multilabel.choose_thresholds(val_scores, val_y.numpy())
    exact = (multilabel.predicted_sets(val_scores, thresholds) == (val_y.numpy() > 0.5)).all(axis=1).mean()
    assert exact > 0.97, f"the multi-label shapes model did not learn the characters (exact sets on validation {exact:.3f})"
    inference = {"objective": "multilabel", "thresholds": [float(t) for t in thresholds], "temperature": temperature}
    save_artifact(path, model, "resnet18", SHAPE_CLASSES, config, head_hidden=64, dropout=0.0, inference=inference)
    return path
