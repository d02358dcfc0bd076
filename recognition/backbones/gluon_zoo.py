"""``gluon:NAME``: a gluoncv ImageNet classification network's feature layers under the face embedding head.

The Gluon block is called on a symbol (no download, ``pretrained=False``), its parameters renamed to stable,
insightface-style names (``gluon_<NAME>_...``, BatchNorm statistics ``*_moving_mean/var``), then the same
``(x - 127.5) * 0.0078125`` normalisation and the fresnet head 'E' (BN-Dropout-FC-BN, ``fc1_output``).

ImageNet weights come only from gluoncv's local model store (``$MXNET_HOME/models``, default ``~/.mxnet/models``);
nothing is downloaded. :func:`load_imagenet_params` returns them under the symbol's names.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Tuple

import mxnet as mx

from recognition.backbones.layers import embedding_head, normalise_input
from recognition.common import ToolkitError, symbol_graph

DEFAULT_EMB_SIZE = 512
# layers after the feature extractor that are dropped (the face head pools with its own FC)
_TAIL_TYPES = ("GlobalAvgPool2D", "GlobalMaxPool2D", "Flatten", "Dense", "Dropout")


def param_prefix(model_name: str) -> str:
    """Stable parameter prefix for ``gluon:model_name`` (Gluon's own prefix has a per-process counter)."""
    return "gluon_" + re.sub(r"[^0-9A-Za-z]+", "_", model_name).strip("_").lower() + "_"


def _create(model_name: str):
    try:
        from gluoncv.model_zoo import get_model, get_model_list
    except ImportError as exc:  # pragma: no cover - gluoncv is a declared dependency
        raise ToolkitError(f"gluon:{model_name}: gluoncv is not importable ({exc})") from None
    if model_name.lower() not in get_model_list():
        close = [n for n in get_model_list() if model_name.lower().split("_")[0] in n][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ToolkitError(f"--network gluon:{model_name}: not a gluoncv model{hint}")
    return get_model(model_name, pretrained=False)


def _feature_blocks(net) -> list:
    """Child blocks from input to the last spatial feature map (classifier and global pooling removed)."""
    source = net.features if hasattr(net, "features") else net
    blocks = []
    for name, child in source._children.items():
        if type(child).__name__ in _TAIL_TYPES or name in ("fc", "output", "classifier", "avgpool", "flat"):
            break
        blocks.append(child)
    if not blocks:
        raise ToolkitError(f"gluon network {type(net).__name__}: found no feature layers to use as a backbone")
    return blocks


def _rename(sym: mx.sym.Symbol, old_prefix: str, new_prefix: str) -> mx.sym.Symbol:
    """Rename Gluon's variables: stable prefix, ``running_*`` -> ``moving_*``, PReLU ``alpha`` -> ``gamma``."""
    graph = symbol_graph(sym)
    for node in graph["nodes"]:
        node["name"] = _stable_name(node["name"], old_prefix, new_prefix)
    return mx.sym.load_json(json.dumps(graph))


def _stable_name(name: str, old_prefix: str, new_prefix: str) -> str:
    if name.startswith(old_prefix):
        name = new_prefix + name[len(old_prefix):]
    name = re.sub(r"_running_(mean|var)$", r"_moving_\1", name)
    return re.sub(r"_alpha$", "_gamma", name)


def features_symbol(model_name: str) -> Tuple[mx.sym.Symbol, object, List]:
    """``(features symbol on normalised data, gluon net, feature blocks)``; the symbol's input is ``data``."""
    net = _create(model_name)
    blocks = _feature_blocks(net)
    body = normalise_input(mx.sym.var("data"))
    for block in blocks:
        body = block(body)
    return _rename(body, net.prefix, param_prefix(model_name)), net, blocks


def model_file(model_name: str) -> str:
    """Path of gluoncv's ImageNet weights for ``model_name`` in the local store; ToolkitError when absent."""
    from gluoncv.model_zoo import model_store

    root = os.path.join(os.path.expanduser(os.environ.get("MXNET_HOME", os.path.join("~", ".mxnet"))), "models")
    try:
        file_name = f"{model_name.lower()}-{model_store.short_hash(model_name.lower())}.params"
    except ValueError:
        raise ToolkitError(f"gluon:{model_name}: gluoncv publishes no ImageNet weights for this model") from None
    path = os.path.join(root, file_name)
    if not os.path.isfile(path):
        raise ToolkitError(f"gluon:{model_name}: ImageNet weights not found at {path} (looked only in gluoncv's "
                           f"local model store; nothing is downloaded: copy {file_name} there, or drop "
                           f"imagenet_pretrained)")
    return path


def build(name: str, emb_size: int, prelu: str = "fast", imagenet_pretrained: bool = False, dropout: float = 0.4,
          bn_mom: float = 0.9) -> mx.sym.Symbol:
    """Symbol from ``data`` (N, 3, 112, 112) to ``fc1_output`` (N, emb_size); ``name`` is ``gluon:MODEL``.

    ``prelu`` has no effect (gluoncv models use their own activations). With ``imagenet_pretrained`` the local
    weights file must exist (checked here, before any compute); load it with :func:`load_imagenet_params`.
    """
    model_name = name.split(":", 1)[1]
    if imagenet_pretrained:
        model_file(model_name)
    body, _, _ = features_symbol(model_name)
    return embedding_head(body, emb_size, "E", bn_mom=bn_mom, dropout=dropout)


def load_imagenet_params(name: str) -> Tuple[Dict[str, mx.nd.NDArray], Dict[str, mx.nd.NDArray]]:
    """ImageNet weights of ``gluon:MODEL`` (or ``MODEL``) as ``(arg_params, aux_params)`` keyed by the names of
    :func:`build`'s symbol; only the feature layers (the classifier is not part of the backbone)."""
    model_name = name.split(":", 1)[1] if name.startswith("gluon:") else name
    path = model_file(model_name)
    sym, net, blocks = features_symbol(model_name)
    net.load_parameters(path, ctx=mx.cpu(), ignore_extra=True)
    wanted_args, wanted_aux = set(sym.list_arguments()), set(sym.list_auxiliary_states())
    arg, aux = {}, {}
    for block in blocks:
        for param in block.collect_params().values():
            key = _stable_name(param.name, net.prefix, param_prefix(model_name))
            if key in wanted_args:
                arg[key] = param.data().copy()
            elif key in wanted_aux:
                aux[key] = param.data().copy()
    return arg, aux


def stages(name: str) -> List[Tuple[str, str]]:
    """Freezing groups: the whole ImageNet backbone, then the embedding head."""
    return [("backbone", "^" + re.escape(param_prefix(name.split(":", 1)[1]))),
            ("embedding", r"^(bn1|pre_fc1|fc1)_")]


def spec(model_name: str):
    """Registry entry for ``gluon:model_name`` (validated lazily at build time)."""
    from recognition.backbones import NetworkSpec

    if not model_name:
        raise ToolkitError("--network gluon:: missing the gluoncv model name (e.g. gluon:mobilenetv2_1.0)")
    return NetworkSpec(build, DEFAULT_EMB_SIZE, stages, "gluon")
