"""Backbone registry: one dict of constructors, looked up by insightface's network names.

>>> sym = get_symbol("y1")                      # data (N,3,112,112) RGB 0-255 -> fc1_output (N,128)
>>> get_stages("r50")[0]                        # ('stem', '^(conv0|bn0|relu0)_')

``gluon:NAME`` builds a gluoncv ImageNet backbone (``NAME`` as in ``gluoncv.model_zoo.get_model``) with the
same normalisation and embedding head.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import mxnet as mx

from recognition.backbones import fmobilefacenet, fmobilenet, fresnet, vargfacenet
from recognition.backbones.fast_prelu import (
    checkpoint_form,
    convert_prelu,
    drop_unit_aux,
    fill_unit_aux,
    to_stock_graph,
)
from recognition.backbones.layers import check_prelu_mode
from recognition.common import ToolkitError

GLUON_PREFIX = "gluon:"


class NetworkSpec(NamedTuple):
    """A registered network: ``build(name, emb_size, prelu, **overrides)``, default width, ``stages(name)``."""

    build: Callable[..., mx.sym.Symbol]
    emb_size: int
    stages: Callable[[str], List[Tuple[str, str]]]
    family: str


NETWORKS: Dict[str, NetworkSpec] = {}


def _register(module, specs: dict, emb_of: Callable[[tuple], int]) -> None:
    for net_name, spec in specs.items():
        NETWORKS[net_name] = NetworkSpec(module.build, emb_of(spec), module.stages, module.__name__.split(".")[-1])


_register(fresnet, fresnet.SPECS, lambda s: s[2])
_register(fmobilefacenet, fmobilefacenet.SPECS, lambda s: s[1])
_register(fmobilenet, fmobilenet.SPECS, lambda s: s)
_register(vargfacenet, vargfacenet.SPECS, lambda s: s)


def list_networks() -> List[str]:
    """Registered names, sorted (``gluon:NAME`` is open-ended and not listed)."""
    return sorted(NETWORKS)


def _spec(name: str) -> NetworkSpec:
    if name in NETWORKS:
        return NETWORKS[name]
    if isinstance(name, str) and name.startswith(GLUON_PREFIX):
        from recognition.backbones import gluon_zoo

        return gluon_zoo.spec(name[len(GLUON_PREFIX):])
    raise ToolkitError(f"--network {name!r}: unknown network; valid names: {', '.join(list_networks())}, "
                       f"or gluon:NAME for a gluoncv ImageNet model (e.g. gluon:mobilenetv2_1.0)")


def default_emb_size(name: str) -> int:
    """The embedding width ``name`` produces without ``emb_size`` (insightface's config for that network)."""
    return _spec(name).emb_size


def get_symbol(name: str, emb_size: Optional[int] = None, prelu: str = "bn", **overrides) -> mx.sym.Symbol:
    """Build network ``name`` as a single-output symbol ``fc1_output``.

    Inputs: variable ``data`` (N, 3, 112, 112) float32 RGB 0-255 (normalised inside the graph).
    Outputs: ``fc1_output`` (N, emb_size), unnormalised embedding.

    ``prelu``: ``'bn'`` (default, fastest on CPU; adds constant ``NAME_unit_moving_mean/_var`` auxiliary states
    that :func:`fill_unit_aux` supplies and :func:`checkpoint_form` drops), ``'fast'`` or ``'stock'``
    (``LeakyReLU act_type=prelu``, insightface's graph); the same ``NAME_gamma`` parameters, so checkpoints move
    between them (:func:`convert_prelu` converts a graph). ``overrides`` are family options (e.g. ``units``, ``widths``,
    ``dropout``, ``bn_mom``, ``act_type`` for fresnet; ``blocks`` for MobileFaceNet; ``imagenet_pretrained`` for gluon).
    """
    spec = _spec(name)
    check_prelu_mode(prelu)
    if emb_size is None:
        emb_size = spec.emb_size
    if not isinstance(emb_size, int) or emb_size <= 0:
        raise ToolkitError(f"--emb-size {emb_size!r}: must be a positive integer")
    accepted = set(inspect.signature(spec.build).parameters) - {"name", "emb_size", "prelu"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ToolkitError(f"network {name}: unknown option(s) {', '.join(unknown)}; "
                           f"accepted: {', '.join(sorted(accepted)) or 'none'}")
    sym = spec.build(name, emb_size, prelu=prelu, **overrides)
    outputs = sym.list_outputs()
    assert outputs == ["fc1_output"], outputs  # a builder bug, not a user error
    return sym


# insightface's network-structure keys (config.net_* and train_softmax.py's --version-*), their insightface
# defaults, and the build option each maps to per family (None: that family's builder has no such option).
NET_KEYS = {"net_output": "E", "net_se": 0, "net_input": 1, "net_unit": 3, "net_act": "prelu", "net_blocks": None,
            "net_multiplier": 1.0, "bn_mom": 0.9}
_FAMILY_OPTIONS = {
    "fresnet": {"net_output": "head", "net_se": "se", "net_input": "input", "net_unit": "unit", "net_act": "act_type",
                "bn_mom": "bn_mom"},
    "fmobilefacenet": {"net_output": "head", "net_blocks": "blocks", "net_act": "act_type", "bn_mom": "bn_mom"},
    "fmobilenet": {"net_output": "head", "net_multiplier": "multiplier", "net_act": "act_type", "bn_mom": "bn_mom"},
    "vargfacenet": {"bn_mom": "bn_mom"},
}
# a family's own value of a key it has no option for, where it differs from insightface's default
_FAMILY_FIXED = {"vargfacenet": {"net_output": "J"}, "gluon": {"net_output": "E"}}
# what each family builds for a key it maps (anything else is one line listing these)
_SUPPORTED = {"net_unit": (1, 2, 3), "net_se": (0, 1), "net_input": (0, 1),
              "net_act": ("prelu", "relu", "sigmoid", "tanh", "softrelu")}


def network_options(name: str, keys: dict) -> dict:
    """Build options of network ``name`` from insightface's ``net_*`` keys (``--version-*`` flags, config keys).

    ``keys``: ``{net_output, net_se, net_input, net_unit, net_act, net_blocks, net_multiplier, bn_mom}`` (None or
    absent = the network's own). A key the family builds becomes an option of :func:`get_symbol`; a key it does
    not have is refused in one line unless it holds insightface's default (which is what that family builds);
    an unsupported value is one line listing the supported ones.
    """
    from recognition.backbones.layers import check_head

    given = {k: v for k, v in keys.items() if v is not None}
    unknown = sorted(set(given) - set(NET_KEYS))
    if unknown:
        raise ToolkitError(f"network options: unknown key(s) {', '.join(unknown)}; known: {', '.join(NET_KEYS)}")
    family = _spec(name).family
    mapping = _FAMILY_OPTIONS.get(family, {})
    out = {}
    for key, value in given.items():
        if key in _SUPPORTED and value not in _SUPPORTED[key]:
            raise ToolkitError(f"--network {name}: {key}={value!r} is not built here; supported: "
                               f"{', '.join(map(str, _SUPPORTED[key]))}")
        if key == "net_output":
            check_head(str(value))
        if key in mapping:
            out[mapping[key]] = list(value) if key == "net_blocks" else value
        elif value != _FAMILY_FIXED.get(family, {}).get(key, NET_KEYS[key]) and \
                not (key == "net_blocks" and family != "fmobilefacenet"):
            raise ToolkitError(f"--network {name}: {key}={value!r} has no meaning for {family} networks; "
                               f"it takes {', '.join(sorted(mapping)) or 'none of the net_* keys'}")
    return out


def get_stages(name: str) -> List[Tuple[str, str]]:
    """``[(stage_name, regex), ...]`` from input to embedding; together they match every parameter name
    (arguments except ``data``, and auxiliary states) of ``get_symbol(name)``. The last stage is ``embedding``.
    """
    spec = _spec(name)
    return spec.stages(name)


def load_imagenet_params(name: str):
    """``(arg_params, aux_params)`` of gluoncv's ImageNet weights for ``gluon:NAME``, keyed by the names of
    ``get_symbol('gluon:NAME')`` (feature layers only), from the local model store; nothing is downloaded.
    Raises :class:`ToolkitError` naming the path it looked at when the file is absent.
    """
    if not (isinstance(name, str) and name.startswith(GLUON_PREFIX)):
        raise ToolkitError(f"--network {name!r}: ImageNet weights exist only for gluon:NAME networks")
    from recognition.backbones import gluon_zoo

    return gluon_zoo.load_imagenet_params(name)


def random_params(sym, seed: int = 0, data_shape: Tuple[int, ...] = (1, 3, 112, 112)) -> Tuple[dict, dict]:
    """Random but well-scaled ``(arg, aux)`` for ``sym`` (benchmarks and tests of untrained graphs): He-scaled
    weights, BatchNorm gammas in [0.3, 0.7] (keeps deep nets finite; a stored gamma is never exactly 1), small
    betas/biases and random statistics (the fast PReLU's constant states stay 0 and 1)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=data_shape)
    arg, aux = {}, {}
    for name, shape in zip(sym.list_arguments(), arg_shapes):
        if name == "data":
            continue
        if name.endswith("_gamma"):
            value = rng.uniform(0.3, 0.7, shape)
        elif name.endswith(("_beta", "_bias")):
            value = rng.normal(0, 0.1, shape)
        else:
            value = rng.normal(0, np.sqrt(2.0 / max(1, int(np.prod(shape[1:])))), shape)
        arg[name] = mx.nd.array(value)
    for name, shape in zip(sym.list_auxiliary_states(), aux_shapes):
        aux[name] = mx.nd.array(rng.normal(0, 0.1, shape) if name.endswith("mean") else rng.uniform(0.5, 1.5, shape))
    # the fast PReLU's BatchNorm states are constants (0 and 1), never statistics: random ones would make a graph
    # that is no PReLU at all (and disagree with its stock form and every export)
    return arg, fill_unit_aux(sym, drop_unit_aux(aux))


__all__ = ["NET_KEYS", "random_params", "network_options",
           "NETWORKS", "NetworkSpec", "checkpoint_form", "convert_prelu", "default_emb_size", "drop_unit_aux",
           "fill_unit_aux",
           "get_stages", "get_symbol", "list_networks", "load_imagenet_params", "to_stock_graph"]
