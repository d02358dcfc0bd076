"""Embeddings of aligned face crops from any toolkit or insightface checkpoint (full or slim, old or new naming).

    model = FaceModel("../models/model-y1-test2/model,0")
    f = model.get_feature("face.jpg")            # (E,) L2-normalised, flip-summed
    F = model.get_features([img1, img2, ...])    # (N, E)

Images are aligned crops (see ``deploy/align.py``): ``uint8`` arrays ``(H, W, 3)`` in RGB order, or file paths
(read with OpenCV, converted from BGR). The network needs ``image_size x image_size``; other sizes are an error
unless ``resize=True``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from recognition.checkpoint_graph import cut_at_embedding
from recognition.common import ToolkitError, load_checkpoint, parse_ctx, parse_prefix_epoch
from recognition.verification import BACKEND_HELP, BACKENDS, make_embedder

ImageLike = Union[str, np.ndarray]


def read_image(path: str) -> np.ndarray:
    """Read an image file as ``uint8 (H, W, 3)`` RGB; unreadable -> :class:`ToolkitError` naming the file."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ToolkitError(f"{path}: cannot read image (missing, unreadable or not an image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image(buf: bytes, where: str = "image") -> np.ndarray:
    """Decode encoded image bytes (JPEG/PNG) as ``uint8 (H, W, 3)`` RGB."""
    import cv2

    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR) if len(buf) else None
    if img is None:
        raise ToolkitError(f"{where}: cannot decode image bytes")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def prepare_face(image: ImageLike, image_size: Tuple[int, int] = (112, 112), resize: bool = False) -> np.ndarray:
    """An image path or array -> ``uint8 (H, W, 3)`` RGB of the network size (resized only when asked)."""
    import cv2

    where = image if isinstance(image, str) else "image array"
    img = read_image(image) if isinstance(image, str) else np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ToolkitError(f"{where}: expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    h, w = image_size
    if img.shape[:2] != (h, w):
        if not resize:
            raise ToolkitError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, the model takes aligned "
                               f"{w}x{h} crops (align with deploy/align.py, or pass resize=True / --resize)")
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR)
    return img


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of ``(N, E)``."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FaceModel:
    """A checkpoint cut at ``fc1_output``, bound once for batched inference (reuses ``verification.Embedder``).

    Parameters
    ----------
    prefix_epoch : str
        ``PREFIX,EPOCH`` (or ``PREFIX-0000.params``).
    ctx : mx.Context or list, default ``mx.cpu()``.
    image_size : int or (H, W)
    flip : bool
        Embedding = normalise(emb(img) + emb(mirrored img)), as verification does.
    batch_size : int
    resize : bool
        Resize other sizes to ``image_size`` instead of refusing them.
    backend : str
        ``auto`` (default: ``onnx`` on CPU when onnxruntime is installed, else ``mxnet``), ``onnx`` (onnxruntime on
        the checked export; the fastest measured on CPU), ``mxnet`` (BatchNorm folded; for GPUs) or ``mxnet-plain``
        (the checkpoint's graph as it is). ``self.backend`` is the engine chosen.
    """

    def __init__(self, prefix_epoch: str, ctx=None, image_size: Union[int, Sequence[int]] = 112, flip: bool = True,
                 batch_size: int = 32, resize: bool = False, backend: str = "auto"):
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.flip, self.resize, self.batch_size = bool(flip), bool(resize), int(batch_size)
        if self.batch_size < 1:
            raise ToolkitError(f"batch_size {batch_size}: must be >= 1")
        prefix, epoch = parse_prefix_epoch(prefix_epoch, "--model")
        ctx = ctx if ctx is not None else parse_ctx("cpu")
        # With flip, originals and mirrors go through in one forward: bind twice the batch.
        bound = self.batch_size * (2 if self.flip else 1)
        symbol, arg_params, aux_params = load_checkpoint(prefix, epoch)
        self.embedder = make_embedder(cut_at_embedding(symbol, f"{prefix}-symbol.json"), arg_params, aux_params,
                                      ctx, bound, (3,) + self.image_size, backend)
        self.backend = self.embedder.backend

    @property
    def embedding_size(self) -> int:
        return self.embedder.embedding_size

    def embed_arrays(self, faces: np.ndarray) -> np.ndarray:
        """``uint8 (N, H, W, 3)`` RGB aligned faces -> L2-normalised float32 ``(N, E)``."""
        x = np.ascontiguousarray(np.asarray(faces).transpose(0, 3, 1, 2), dtype=np.float32)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        if self.flip:
            out = self.embedder(np.concatenate([x, x[:, :, :, ::-1]], axis=0))
            emb = out[:n] + out[n:]
        else:
            emb = self.embedder(x)
        return l2_normalize(emb).astype(np.float32)

    def get_features(self, images: Sequence[ImageLike], batch_size: Optional[int] = None) -> np.ndarray:
        """Images (paths or RGB arrays) -> L2-normalised float32 ``(N, E)``, computed ``batch_size`` at a time."""
        bs = int(batch_size or self.batch_size)
        out = []
        for start in range(0, len(images), bs):
            faces = np.stack([prepare_face(im, self.image_size, self.resize) for im in images[start:start + bs]])
            out.append(self.embed_arrays(faces))
        return np.concatenate(out) if out else np.zeros((0, self.embedding_size), np.float32)

    def get_feature(self, image: ImageLike) -> np.ndarray:
        """One image (path or RGB array) -> L2-normalised float32 ``(E,)``."""
        return self.get_features([image])[0]


def add_model_args(parser) -> None:
    """The flags every deploy command shares to build a :class:`FaceModel`."""
    parser.add_argument("--model", required=True, help="PREFIX,EPOCH of the checkpoint (full or slim)")
    parser.add_argument("--ctx", default="", help="cpu, gpu:0 (default: CUDA_VISIBLE_DEVICES or cpu)")
    parser.add_argument("--image-size", type=int, default=112, help="network input side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-flip", action="store_true", help="embed without the mirrored image")
    parser.add_argument("--resize", action="store_true", help="resize images that are not image-size squares")
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help=BACKEND_HELP)


def model_from_args(args) -> FaceModel:
    """Build a :class:`FaceModel` from :func:`add_model_args` flags."""
    return FaceModel(args.model, parse_ctx(args.ctx) if args.ctx else None, args.image_size,
                     flip=not args.no_flip, batch_size=args.batch_size, resize=args.resize,
                     backend=getattr(args, "backend", "auto"))
