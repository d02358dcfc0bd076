"""Face detection with insightface's MXNet MTCNN (P-Net, R-Net, O-Net, optional L-Net), then ArcFace alignment.

    det = MtcnnDetector("../models/mtcnn")              # insightface's deploy/mtcnn-model folder
    faces = det.detect(rgb)                              # [Face(box, score, landmarks)], best score first
    crops = align_faces(rgb, det, rule="largest")        # [(112x112x3 uint8 RGB crop, Face)]

The cascade follows Zhang et al. 2016 (see ``deploy/mtcnn_boxes.py``): P-Net slides over an image pyramid (the
smallest face ``min_face_size`` pixels, scale step ``factor``), R-Net and O-Net re-score and regress the
surviving windows (thresholds per stage), O-Net gives five landmarks (left eye, right eye, nose, left and right
mouth corners as seen in the image), and L-Net (``det4``) can refine them. Inputs to every net are
``(x - 127.5) / 128`` in NCHW.

Channel order and layout were measured on the real photos in ``../shared/raw`` (see ``INPUT_ORDER``): these
converted weights take BGR images in the normal (H, W) layout; the Caffe originals' transposed (W, H) input does
not apply to them.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from deploy.mtcnn_boxes import crop_resized, nms, pnet_candidates, pyramid_scales, regress, to_square
from recognition.common import ToolkitError, symbol_graph

# Measured on ../shared/raw (README, "Raw photos"): fed BGR, O-Net scored 8 of the 10 real faces higher than fed
# RGB (mean logit +2.5; e.g. Nathalie_Baye_0002 0.9963 vs 0.9921) and the aligned crops came closer to the
# reference crops on all three LFW photos (embedding cosine 0.970-0.980 vs 0.950-0.979); insightface's deploy code
# also hands the detector cv2's BGR. Transposed (W, H) input, as the
# Caffe originals take it: RGB found none of the four single faces, BGR two of them at 0.84-0.87 with the eyes
# stacked vertically, and t1.jpg gave 4 (BGR) or 0 (RGB) faces instead of 6.
INPUT_ORDER = "bgr"
RULES = ("largest", "central", "all")
# one input per net, to check parameter shapes at load time (P-Net is fully convolutional: its smallest window)
_NET_INPUT = {"det1": (1, 3, 12, 12), "det2": (1, 3, 24, 24), "det3": (1, 3, 48, 48), "det4": (1, 15, 24, 24)}


@dataclass
class Face:
    """One detected face: ``box`` float32 (4,) x1, y1, x2, y2; ``score`` in [0, 1]; ``landmarks`` float32 (5, 2)
    (x, y) image pixels in the order of ``deploy.align.reference_landmarks``."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


class _Net:
    """One MTCNN net, its SoftmaxOutput heads replaced by plain softmax, bound once per input shape (LRU)."""

    def __init__(self, model_dir: str, name: str, ctx, cache: int = 24):
        import mxnet as mx

        prefix = os.path.join(model_dir, name)
        sym_file, par_file = f"{prefix}-symbol.json", f"{prefix}-0001.params"
        try:
            symbol = mx.sym.load(sym_file)
            graph = symbol_graph(symbol)
        except Exception as exc:  # mxnet raises MXNetError/ValueError/JSON errors for a broken file
            raise ToolkitError(f"{sym_file}: not an MXNet symbol file ({_first_line(exc)})") from None
        try:
            saved = mx.nd.load(par_file)
        except Exception as exc:
            raise ToolkitError(f"{par_file}: not an MXNet params file ({_first_line(exc)})") from None
        self.args = {k[4:]: v for k, v in saved.items() if k.startswith("arg:")}
        self.aux = {k[4:]: v for k, v in saved.items() if k.startswith("aux:")}
        internals = symbol.get_internals()
        heads = []
        for i, (node_id, _, _) in enumerate(graph["heads"]):
            node = graph["nodes"][node_id]
            if node["op"] == "SoftmaxOutput":  # training head: keep only its softmax, drop the label input
                data = graph["nodes"][node["inputs"][0][0]]["name"]
                heads.append(mx.sym.softmax(internals[data + "_output"], axis=1))
            else:
                heads.append(symbol[i])
        self.symbol = mx.sym.Group(heads)
        missing = [a for a in self.symbol.list_arguments() if a != "data" and a not in self.args]
        if missing:
            raise ToolkitError(f"{par_file}: lacks {len(missing)} parameter(s) of {name}: {', '.join(missing[:5])}")
        try:
            shapes, _, _ = self.symbol.infer_shape(data=_NET_INPUT.get(name, (1, 3, 48, 48)))
        except Exception as exc:
            raise ToolkitError(f"{sym_file}: the graph does not take {name}'s input ({_first_line(exc)})") from None
        wrong = [f"{a} {tuple(self.args[a].shape)} (graph: {tuple(shp)})"
                 for a, shp in zip(self.symbol.list_arguments(), shapes)
                 if a != "data" and tuple(self.args[a].shape) != tuple(shp)]
        if wrong:
            raise ToolkitError(f"{par_file}: parameter shapes do not fit {name}'s graph: {', '.join(wrong[:3])}")
        self.ctx, self.cache = ctx, int(cache)
        self._execs: "OrderedDict[tuple, object]" = OrderedDict()

    def _executor(self, shape: tuple):
        import mxnet as mx

        ex = self._execs.pop(shape, None)
        if ex is None:
            args = {k: v.as_in_context(self.ctx) for k, v in self.args.items() if k in self.symbol.list_arguments()}
            args["data"] = mx.nd.zeros(shape, ctx=self.ctx)
            aux = {k: v.as_in_context(self.ctx) for k, v in self.aux.items()}
            ex = self.symbol.bind(self.ctx, args=args, aux_states=aux, grad_req="null")
            self.args.update({k: v for k, v in args.items() if k != "data"})  # later binds share these arrays
        self._execs[shape] = ex
        while len(self._execs) > self.cache:
            self._execs.popitem(last=False)
        return ex

    def __call__(self, x: np.ndarray) -> List[np.ndarray]:
        """``x`` float32 (N, C, H, W), already normalised -> the net's outputs as numpy arrays."""
        ex = self._executor(tuple(x.shape))
        ex.arg_dict["data"][:] = x
        ex.forward(is_train=False)
        return [o.asnumpy() for o in ex.outputs]

    def batched(self, x: np.ndarray, max_batch: int = 128) -> List[np.ndarray]:
        """Run ``x (N, ...)`` in chunks padded to a power of two, so that few shapes are ever bound."""
        outs = []
        for start in range(0, len(x), max_batch):
            part = x[start:start + max_batch]
            n = len(part)
            size = 1 << max(n - 1, 0).bit_length()
            if size > n:
                part = np.concatenate([part, np.zeros((size - n,) + part.shape[1:], part.dtype)])
            outs.append([o[:n] for o in self(part)])
        return [np.concatenate(cols) for cols in zip(*outs)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _nchw(batch: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` pixels 0-255 -> normalised ``float32 (N, C, H, W)``."""
    return np.ascontiguousarray(((batch - 127.5) * 0.0078125).transpose(0, 3, 1, 2), dtype=np.float32)


class MtcnnDetector:
    """MTCNN over RGB photos: ``detect(image) -> [Face]`` sorted by score, best first.

    Parameters
    ----------
    model_dir : folder with ``det1``..``det3`` (and ``det4`` for ``refine_landmarks``) ``-symbol.json`` +
        ``-0001.params``, as insightface's ``deploy/mtcnn-model``.
    ctx : mx.Context, default CPU.
    min_face_size : smallest face side in pixels that the pyramid looks for.
    thresholds : face probability needed to pass P-Net, R-Net and O-Net.
    factor : scale step of the image pyramid.
    refine_landmarks : run L-Net (``det4``) on patches around each landmark.

    ``detect`` may be called from several threads (the bound nets are shared, so calls take turns). Its time grows
    with the photo's area over ``min_face_size`` squared: raise ``min_face_size`` for large photos of large faces.
    """

    def __init__(self, model_dir: str, ctx=None, min_face_size: float = 20,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.8), factor: float = 0.709, refine_landmarks: bool = False):
        import mxnet as mx

        if not os.path.isdir(model_dir):
            raise ToolkitError(f"--detect {model_dir}: no such folder (insightface's deploy/mtcnn-model: det1..det4)")
        thresholds = tuple(float(t) for t in thresholds)
        if len(thresholds) != 3 or not all(0.0 <= t < 1.0 for t in thresholds):
            raise ToolkitError(f"MTCNN thresholds {thresholds}: expected three probabilities in [0, 1)")
        if not 0.0 < factor < 1.0:
            raise ToolkitError(f"MTCNN pyramid factor {factor}: must lie in (0, 1)")
        if not min_face_size > 0:
            raise ToolkitError(f"--min-face-size {min_face_size}: must be > 0 pixels")
        self.model_dir, self.min_face_size, self.thresholds, self.factor = model_dir, float(min_face_size), \
            thresholds, float(factor)
        self.ctx = ctx if ctx is not None else mx.cpu()
        self.input_order = INPUT_ORDER
        nets = ("det1", "det2", "det3", "det4") if refine_landmarks else ("det1", "det2", "det3")
        for path in (os.path.join(model_dir, n + suffix) for n in nets for suffix in ("-symbol.json", "-0001.params")):
            if not os.path.isfile(path):  # every file checked before any net loads
                raise ToolkitError(f"{path}: MTCNN file missing (--detect takes insightface's deploy/mtcnn-model "
                                   "folder: det1..det4 -symbol.json and -0001.params)")
        self.pnet, self.rnet, self.onet = (_Net(model_dir, n, self.ctx) for n in nets[:3])
        self.lnet = _Net(model_dir, "det4", self.ctx) if refine_landmarks else None
        self._lock = threading.Lock()

    def detect(self, image_rgb: np.ndarray) -> List[Face]:
        """``uint8 (H, W, 3)`` RGB (grey ``(H, W)`` accepted) -> faces sorted by score, best first."""
        img = np.asarray(image_rgb)
        if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
            img = np.repeat(img.reshape(img.shape[0], img.shape[1], 1), 3, axis=2)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ToolkitError(f"detect: expected an (H, W, 3) RGB image, got shape {img.shape}")
        x = (img[:, :, ::-1] if self.input_order == "bgr" else img).astype(np.float32)
        with self._lock:
            return self._cascade(x)

    def _cascade(self, x: np.ndarray) -> List[Face]:
        """P-Net, R-Net, O-Net (and L-Net) on ``x`` float32 (H, W, 3) in the nets' channel order."""
        import cv2

        h, w = x.shape[:2]
        t1, t2, t3 = self.thresholds
        # stage 1: P-Net on every pyramid level, NMS inside each level, then across levels
        found = []
        for scale in pyramid_scales(h, w, self.min_face_size, self.factor):
            level = cv2.resize(x, (int(math.ceil(w * scale)), int(math.ceil(h * scale))),
                               interpolation=cv2.INTER_LINEAR)
            reg, prob = self.pnet(_nchw(level[None]))
            cand = pnet_candidates(prob[0, 1], reg[0], scale, t1)
            found.append(cand[nms(cand, 0.5, "union")])
        boxes = np.concatenate(found) if found else np.zeros((0, 9), np.float32)
        if not len(boxes):
            return []
        boxes = boxes[nms(boxes, 0.7, "union")]
        boxes = to_square(regress(boxes[:, :5], boxes[:, 5:9]))
        # stage 2: R-Net re-scores 24x24 crops and regresses the boxes
        reg, prob = self.rnet.batched(_nchw(crop_resized(x, boxes, 24)))
        keep = prob[:, 1] > t2
        boxes, reg = boxes[keep], reg[keep]
        if not len(boxes):
            return []
        boxes[:, 4] = prob[keep, 1]
        pick = nms(boxes, 0.7, "union")
        boxes = to_square(regress(boxes[pick], reg[pick]))
        # stage 3: O-Net on 48x48 crops: final score, box and five landmarks (relative to the square box)
        marks, reg, prob = self.onet.batched(_nchw(crop_resized(x, boxes, 48)))
        keep = prob[:, 1] > t3
        boxes, reg, marks = boxes[keep], reg[keep], marks[keep]
        if not len(boxes):
            return []
        boxes[:, 4] = prob[keep, 1]
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = np.stack([boxes[:, 0:1] + bw * marks[:, 0:5], boxes[:, 1:2] + bh * marks[:, 5:10]], axis=2)
        boxes = regress(boxes, reg)
        pick = nms(boxes, 0.7, "min")
        boxes, points = boxes[pick], points[pick]
        if self.lnet is not None:
            points = self._refine(x, boxes, points)
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w - 1)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h - 1)
        order = np.argsort(-boxes[:, 4], kind="stable")
        return [Face(boxes[i, :4].astype(np.float32), float(boxes[i, 4]), points[i].astype(np.float32))
                for i in order]

    def _refine(self, x: np.ndarray, boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
        """L-Net: a square patch (a quarter of the face side, even) around each landmark, 24x24, all five stacked
        as 15 channels; each output is the landmark's position inside its patch. Moves beyond 0.35 of the patch
        from its centre are not trusted (the landmark stays where O-Net put it)."""
        side = np.maximum(boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1)
        patch = np.round(side * 0.25)
        patch += np.mod(patch, 2)
        corners = np.round(points - 0.5 * patch[:, None, None])  # (N, 5, 2) top-left of each patch
        crops = [_nchw(crop_resized(x, np.column_stack([corners[:, k], corners[:, k] + patch[:, None] - 1]), 24))
                 for k in range(5)]
        outs = self.lnet.batched(np.concatenate(crops, axis=1))
        refined = points.copy()
        for k, off in enumerate(outs):
            trusted = np.all(np.abs(off - 0.5) <= 0.35, axis=1)
            refined[trusted, k] = corners[trusted, k] + off[trusted] * patch[trusted, None]
        return refined


def select_faces(faces: Sequence[Face], rule: str, image_shape: Sequence[int]) -> List[Face]:
    """Faces to keep under ``rule``: 'largest' (box area), 'central' (box centre nearest the image centre) or
    'all' (every face, best score first). ``image_shape`` is ``(H, W[, C])``. No face -> ``[]``."""
    if rule not in RULES:
        raise ToolkitError(f"--faces {rule!r}: choose one of {', '.join(RULES)}")
    faces = list(faces)
    if rule == "all" or not faces:
        return faces
    if rule == "largest":
        return [max(faces, key=lambda f: f.area)]  # max keeps the first (best-scored) among equal areas
    cy, cx = (image_shape[0] - 1) / 2.0, (image_shape[1] - 1) / 2.0
    return [min(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2)]


def align_faces(image_rgb: np.ndarray, detector: MtcnnDetector, rule: str = "largest",
                image_size: int = 112) -> List[Tuple[np.ndarray, Face]]:
    """Detect, keep faces by ``rule`` and warp each onto the ArcFace template: ``[(uint8 (S, S, 3) RGB, Face)]``."""
    return crop_faces(image_rgb, detector.detect(image_rgb), rule, image_size)


def crop_faces(image_rgb: np.ndarray, faces: Sequence[Face], rule: str = "largest",
               image_size: int = 112) -> List[Tuple[np.ndarray, Face]]:
    """:func:`align_faces` for faces already detected in ``image_rgb``."""
    from deploy.align import norm_crop

    kept = select_faces(faces, rule, np.shape(image_rgb))
    return [(norm_crop(np.asarray(image_rgb), f.landmarks, image_size), f) for f in kept]


def alignment_offsets(crop_rgb: np.ndarray, reference_rgb: np.ndarray) -> np.ndarray:
    """How far two aligned crops of one photo place the face: register ``reference_rgb`` onto ``crop_rgb`` (affine,
    OpenCV's ECC on grey levels) and return the shift in crop pixels at each of the 5 template points, ``(5,)``.

    Checks an aligner against another one's crops of the same photo without knowing its landmarks.
    """
    import cv2

    from deploy.align import reference_landmarks

    ref, mine = (cv2.cvtColor(np.asarray(x, np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
                 for x in (reference_rgb, crop_rgb))
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 200, 1e-6)
    try:
        _, warp = cv2.findTransformECC(ref, mine, warp, cv2.MOTION_AFFINE, criteria, None, 5)
    except cv2.error as exc:
        raise ToolkitError(f"alignment_offsets: the two crops do not register ({_first_line(exc)})") from None
    p = reference_landmarks(ref.shape[0])
    return np.linalg.norm(p @ warp[:, :2].T + warp[:, 2] - p, axis=1)


def aligned_face(image_rgb: np.ndarray, detector: MtcnnDetector, rule: str = "largest", image_size: int = 112,
                 where: str = "image") -> np.ndarray:
    """The one face a command embeds per photo: ``uint8 (S, S, 3)`` RGB; no face -> :class:`ToolkitError`."""
    if rule == "all":
        raise ToolkitError("--faces all: this command embeds one face per photo; use --faces largest or central")
    found = align_faces(image_rgb, detector, rule, image_size)
    if not found:
        raise ToolkitError(f"{where}: no face found (MTCNN, --min-face-size {detector.min_face_size:g})")
    return found[0][0]


class FaceDetectingModel:
    """A :class:`deploy.face_model.FaceModel` that takes raw photos: each image (path or RGB array) is detected,
    one face is kept by ``rule`` and aligned, then embedded. Other attributes are the wrapped model's."""

    def __init__(self, model, detector: MtcnnDetector, rule: str = "largest"):
        if model.image_size[0] != model.image_size[1]:
            raise ToolkitError(f"--detect aligns square crops; the model takes {model.image_size}")
        select_faces([], rule, (1, 1))  # validates the rule now, not at the first photo
        if rule == "all":
            raise ToolkitError("--faces all: this command embeds one face per photo; use --faces largest or central")
        self.model, self.detector, self.rule = model, detector, rule

    def __getattr__(self, name):
        return getattr(self.model, name)

    def prepare(self, image) -> np.ndarray:
        """Path or RGB array of a raw photo -> aligned ``uint8 (S, S, 3)`` RGB crop."""
        from deploy.face_model import read_image

        where = image if isinstance(image, str) else "image array"
        img = read_image(image) if isinstance(image, str) else np.asarray(image)
        return aligned_face(img, self.detector, self.rule, self.model.image_size[0], where)

    def get_features(self, images: Sequence, batch_size: Optional[int] = None) -> np.ndarray:
        """Raw photos -> L2-normalised ``float32 (N, E)`` of the face each holds."""
        return self.model.get_features([self.prepare(im) for im in images], batch_size)

    def get_feature(self, image) -> np.ndarray:
        return self.get_features([image])[0]


def add_detector_options(parser) -> None:
    """Detector settings shared by ``--detect`` (deploy tools) and ``datasets.tools align --detector``."""
    parser.add_argument("--faces", default="largest", choices=RULES,
                        help="which face of a photo to keep: the largest box, the most central, or all "
                             "(default %(default)s)")
    parser.add_argument("--min-face-size", type=float, default=20, help="smallest face side in pixels (default 20)")
    parser.add_argument("--det-threshold", type=float, default=0.8,
                        help="final (O-Net) face probability needed (default 0.8; P-Net 0.6, R-Net 0.7)")
    parser.add_argument("--refine-landmarks", action="store_true", help="refine landmarks with det4 (L-Net)")


def add_detect_args(parser) -> None:
    """``--detect DIR`` (raw photos in: detect, align, then embed) and the detector settings."""
    group = parser.add_argument_group("raw photos")
    group.add_argument("--detect", metavar="DIR", default=None,
                       help="inputs are raw photos: detect faces with the MTCNN in DIR (insightface's "
                            "deploy/mtcnn-model: det1..det4) and align them before embedding")
    add_detector_options(group)


def detector_from_args(args, dir_attr: str = "detect") -> Optional[MtcnnDetector]:
    """The detector the flags ask for, or ``None`` without ``--detect``."""
    model_dir = getattr(args, dir_attr, None)
    if not model_dir:
        return None
    return MtcnnDetector(model_dir, min_face_size=args.min_face_size, thresholds=(0.6, 0.7, args.det_threshold),
                         refine_landmarks=args.refine_landmarks)
