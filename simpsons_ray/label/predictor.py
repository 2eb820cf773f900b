"""The predictor of the labeling pipeline: a callable class that loads the model once and scores batches.

Ray Data runs it as an actor pool (``pipeline.py``); it takes the decode stage's
batches (``ingest.py``) and returns the top-k scores that ``commit.py`` writes, and
for a multi-label model every character's score, from which ``commit.py`` lists
the characters on screen, and each frame's signature, from which ``commit.py`` cuts shots.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from simpsons_ray.core.errors import UserError
from simpsons_ray.label.episodes import JPEG, PIXELS
from simpsons_ray.label.ingest import PASSED_ON
from simpsons_ray.label.shots import SIGNATURE_SIZE, signature
from simpsons_ray.model.preprocess import normalize

if TYPE_CHECKING:
    import torch


class FramePredictor:
    """Scores batches of normalised images; the model loads once, in ``__init__``.

    The model runs with its BatchNorms folded into the convolutions and in
    channels_last memory format, on CPU as on GPU (oneDNN's fast path on CPUs; on
    a 2-core machine the two together ran resnet18 at 64 px ~35% faster). On CUDA
    it also runs in bf16 autocast (the fast path of Ampere and later), which can be
    asked for on CPU too: that is how it is tested.

    With ``decode=True`` it takes the output of ``ingest.route_frames`` instead of
    normalised images: JPEG bytes, which it decodes on its own device with
    ``torchvision.io.decode_jpeg`` (nvJPEG on a GPU) and resizes there, and raw
    pixels of frames the CPU tasks decoded. It normalises both on the device.
    """

    def __init__(
        self,
        model_uri: str,
        top_k: int,
        device: str = "cpu",
        mixed_precision: bool | None = None,
        channels_last: bool | None = None,
        cpu_threads: int | None = None,
        expected_model_id: str | None = None,
        decode: bool = False,
    ):
        import torch

        from simpsons_ray.model.artifact import load_artifact
        from simpsons_ray.model.network import fold_batchnorm

        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.mixed_precision = on_cuda if mixed_precision is None else mixed_precision
        self.channels_last = True if channels_last is None else channels_last
        if not on_cuda and cpu_threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1); the forward
            # pass is the heavy stage, so let it use the cores it has been given.
            torch.set_num_threads(max(1, min(cpu_threads, os.cpu_count() or 1)))
        artifact = load_artifact(model_uri, self.device)
        if expected_model_id is not None and artifact.model_id != expected_model_id:
            # Rows carry the id from config.json; weights swapped since would make it a lie.
            raise UserError(
                f"{model_uri}/model.pt is {artifact.model_id} but its config.json says {expected_model_id}: "
                "the weights changed after the artifact was saved; save the model again."
            )
        self.model = fold_batchnorm(artifact.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model_id = artifact.model_id
        self.top_k = min(top_k, len(artifact.classes))
        self.decode = decode
        self.preprocess = artifact.preprocess
        # As the model was scored when trained: calibrated logits, mirror image averaged in.
        self.temperature = artifact.temperature
        self.tta_flip = artifact.tta_flip
        # A sigmoid per character instead of one softmax: several may be on screen, or none.
        self.multilabel = artifact.objective == "multilabel"
        self.num_classes = len(artifact.classes)

    def predict(self, images: "np.ndarray | torch.Tensor") -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 NHWC -> (top-k scores float32, top-k class indices int64), best first."""
        return self.top_k_of(self.scores(images))

    def scores(self, images: "np.ndarray | torch.Tensor") -> "torch.Tensor":
        """Normalised float32 NHWC -> float32 scores (N x classes) on the device, as the model was scored in training.

        softmax(logits / T) for a single-label model; sigmoid(logit / T) per
        character for a multi-label one.
        """
        import torch

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        # The NCHW view of contiguous NHWC memory is channels_last already: no copy.
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision):
            logits = self.model(x)
            if self.tta_flip:
                logits = (logits + self.model(torch.flip(x, dims=[3]))) / 2
        logits = logits.float() / self.temperature
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=1)

    def signatures(self, images: "np.ndarray | torch.Tensor") -> np.ndarray:
        """Normalised float32 NHWC -> each frame's shot signature (shots.signature), from the picture the model saw."""
        import torch

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        mean = torch.tensor(self.preprocess.mean, device=images.device)
        std = torch.tensor(self.preprocess.std, device=images.device)
        return signature(images.float() * std + mean).cpu().numpy()

    def top_k_of(self, scores: "torch.Tensor") -> tuple[np.ndarray, np.ndarray]:
        """(top-k scores float32, top-k class indices int64), best first.

        A multi-label model's sigmoids saturate at exactly 1.0 in float32, so ties
        are common there: a stable sort ranks them in class order, the order
        ``commit.py`` gives equal scores in ``characters``, so ``label``,
        ``top_labels`` and ``characters`` agree on who comes first.
        """
        if self.multilabel:
            values, indices = scores.sort(dim=1, descending=True, stable=True)
            values, indices = values[:, : self.top_k], indices[:, : self.top_k]
        else:
            values, indices = scores.topk(self.top_k, dim=1)
        return values.cpu().numpy().astype(np.float32), indices.cpu().numpy().astype(np.int64)

    def decode_batch(self, data: np.ndarray, encoding: np.ndarray) -> tuple["torch.Tensor", np.ndarray]:
        """route_frames' frames -> (normalised float32 NHWC on the device, error per frame; "" if decoded).

        JPEGs are decoded together in one decode_jpeg call; if one of them is
        corrupt the call fails, and they are decoded one by one to find it. Frames
        of the same size are resized together, with antialiasing, as PIL does.
        """
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        size = self.preprocess.image_size
        errors = np.full(len(data), "", dtype=object)
        pixels: list[torch.Tensor | None] = [None] * len(data)
        jpegs = [i for i, e in enumerate(encoding) if e == JPEG]
        if jpegs:
            encoded = [torch.from_numpy(np.frombuffer(data[i], dtype=np.uint8).copy()) for i in jpegs]
            try:
                decoded: list[Any] = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                decoded = []
                for one in encoded:
                    try:
                        decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError as exc:
                        decoded.append(exc)
            by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for i, image in zip(jpegs, decoded):
                if isinstance(image, Exception):
                    errors[i] = f"cannot decode image: {str(image).splitlines()[0]}"
                else:
                    pixels[i] = image
                    by_shape[tuple(image.shape)].append(i)
            for shape, rows in by_shape.items():
                if shape[1:] != (size, size):
                    resized = F.resize(torch.stack([p for i in rows if (p := pixels[i]) is not None]), [size, size], InterpolationMode.BILINEAR, antialias=True)
                    for i, image in zip(rows, resized):
                        pixels[i] = image
        for i, e in enumerate(encoding):
            if e == PIXELS:
                hwc = np.frombuffer(data[i], dtype=np.uint8).reshape(size, size, 3)
                pixels[i] = torch.from_numpy(hwc.copy()).permute(2, 0, 1).to(self.device)
        good = [p for p in pixels if p is not None]
        if not good:
            return torch.empty((0, size, size, 3)), errors
        return normalize(torch.stack(good).permute(0, 2, 3, 1), self.preprocess).permute(0, 2, 3, 1), errors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = np.array(batch["error"], dtype=object)
        ok = np.array([not e for e in errors], dtype=bool)
        n = len(ok)
        scores = np.zeros((n, self.top_k), dtype=np.float32)
        indices = np.full((n, self.top_k), -1, dtype=np.int64)
        # Every score, for pooling over shots: a few dozen floats a frame, next to a frame's thousands of pixels.
        every = np.zeros((n, self.num_classes), dtype=np.float32)
        signatures = np.zeros((n, SIGNATURE_SIZE), dtype=np.float32)
        images = None
        if self.decode and ok.any():
            images, decode_errors = self.decode_batch(batch["data"][ok], batch["encoding"][ok])
            errors[ok] = decode_errors  # every frame in `ok` had no error before
            ok[ok] = decode_errors == ""
        elif ok.any():
            images = batch["image"][ok]
        if ok.any() and images is not None:
            probs = self.scores(images)
            scores[ok], indices[ok] = self.top_k_of(probs)
            every[ok] = probs.cpu().numpy()
            signatures[ok] = self.signatures(images)
        out = {k: batch[k] for k in PASSED_ON}
        out["error"] = errors
        out["top_scores"] = scores
        out["top_indices"] = indices
        out["scores"], out["signature"] = every, signatures
        return out
