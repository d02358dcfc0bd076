"""Training configuration as an easydict tree, in the shape of insightface's ``recognition/config.py``.

Sections: ``config`` (global knobs), ``network.NAME``, ``dataset.NAME``, ``loss.NAME`` and ``default`` (the
values flags fall back to). :func:`resolve_config` flattens them for one run, lowest precedence first::

    config < default < network[NAME] < dataset[NAME] < loss[NAME] < --config FILE < explicit flags < --set k=v

``--config`` takes ``.json``, ``.yaml``/``.yml`` (needs PyYAML) or ``.py``: its ``config`` dict, and an insightface
``sample_config.py``/``config.py`` unchanged (its module-level ``config``, ``network``, ``dataset``, ``loss`` and
``default`` dicts). insightface's key names are read as ours (:data:`INSIGHTFACE_KEYS`: ``loss_s``, ``loss_m1/m2/m3``,
``image_shape``); keys that only describe what the section's name already says (``net_name``, ``num_layers``,
``loss_name``) are checked against it; keys with no meaning here are logged one line each and skipped. A file may
override sections (``{"loss": {"arcface": {"margin_m": 0.45}}}``) or flat keys (``{"lr": 0.01}``); ``--set``
takes ``key=value`` with dotted section keys (``loss.arcface.margin_m=0.45``) or flat keys (``lr=0.01``).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import runpy
from typing import Iterable, Optional

from easydict import EasyDict as edict

from recognition.common import ToolkitError
from recognition.objectives import config_sections
from recognition.objectives.base import LOSS_FIELDS

logger = logging.getLogger("recognition")

SECTIONS = ("network", "dataset", "loss")

# insightface config key -> ours
INSIGHTFACE_KEYS = {"loss_s": "margin_s", "loss_m1": "margin_a", "loss_m2": "margin_m", "loss_m3": "margin_b",
                    "image_shape": "image_size"}
# insightface keys that describe what the section name already fixes (checked, then dropped)
_DESCRIPTIVE = ("net_name", "num_layers", "loss_name")
# insightface keys with no effect in this toolkit: a file may hold them (one line each); --set refuses them
IGNORED_FILE_KEYS = {
    "workspace": "cuDNN workspace size; MXNet chooses it here",
    "memonger": "memory planning is not used here",
    "ce_loss": "the cross-entropy loss is always computed and logged here (train.log, metrics.jsonl)",
    "triplet_bag_size": "offline mining bags are --bag-identities identities here",
    "triplet_max_ap": "offline semi-hard mining has no max-ap threshold here",
    "densenet_dropout": "densenet networks are not built here",
}

# Global knobs (insightface config.*). None = "decided elsewhere" (network default, data property, ...).
config = edict()
config.emb_size = None  # None: the network's default width (backbones.default_emb_size)
config.ckpt_embedding = 1  # save the slim graph cut at fc1_output (no fc7)
config.fc7_lr_mult = 1.0
config.fc7_wd_mult = 1.0
config.fc7_no_bias = None  # None: the loss's default (softmax has a bias, margin losses none)
config.center_loss_weight = 0.0
config.max_steps = 0
config.warmup_steps = 0
config.data_rand_mirror = True
config.data_cutoff = 0
config.data_augment = None  # --augment KIND[@S][+KIND[@S]][:P]: datasets.shift applied to a share P of images
config.data_color = 0
config.data_images_filter = 0
config.num_workers = 2
config.num_classes = None  # None: read from the dataset's property file
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]  # insightface's; missing ones are skipped with a warning
config.image_size = (112, 112)
config.prelu = "bn"  # training graph; checkpoints save the stock graph
config.count_flops = False  # log the embedding graph's FLOPs and parameters at train start (recognition.flops)
# network structure (insightface's net_* keys; train_softmax.py's --version-*): None = the network's own
config.net_output = None
config.net_se = None
config.net_input = None
config.net_unit = None
config.net_act = None
config.net_blocks = None
config.net_multiplier = None
config.bn_mom = None

# Network sections: everything structural lives in recognition.backbones; these are per-network training
# defaults (insightface's y1 recipe: 128-d embedding).
network = edict()
for _name, _emb in (("tiny", None), ("r18", 512), ("r34", 512), ("r50", 512), ("r100", 512), ("y1", 128),
                    ("y2", 256), ("m1", 256), ("m05", 256), ("vargfacenet", 512)):
    network[_name] = edict(emb_size=_emb) if _emb else edict()
for _name in ("r50v1", "r49", "r74", "r90", "r98", "r99", "r101", "r124", "r152", "r160", "r200", "r269"):
    network[_name] = edict(emb_size=512)

# Dataset sections: dataset_path, optional num_classes (checked against `property`), targets.
dataset = edict()
dataset.emore = edict(dataset_path="../datasets/faces_emore", num_classes=85742,
                      val_targets=["lfw", "cfp_fp", "agedb_30"])
dataset.retina = edict(dataset_path="../datasets/ms1m-retinaface-t1", num_classes=93431,
                       val_targets=["lfw", "cfp_fp", "agedb_30"])
dataset.synth = edict(dataset_path="data/synth_A", val_targets=["synth_val"])

# Loss sections: every default of each registered objective (LossConfig fields, plus training defaults a loss
# needs such as the triplet losses' per_batch_size), generated from recognition.objectives: one place per fact.
loss = edict({_name: edict(_section) for _name, _section in config_sections().items()})

# Flag defaults (insightface default.*).
default = edict()
default.network = "r100"
default.dataset = "emore"
default.data_dir = None
default.loss = "arcface"
default.pretrained = ""
default.pretrained_epoch = 1  # insightface's: a bare --pretrained PREFIX loads PREFIX-0001.params
default.frequent = 20
default.verbose = 2000
default.kvstore = "device"
default.end_epoch = 10000
default.lr = 0.1
default.lr_steps = "100000,160000,220000"
default.lr_steps_batch = None  # N: lr_steps are for a global batch of N and scale by N / batch (train_softmax.py)
default.wd = 0.0005
default.mom = 0.9
default.per_batch_size = 128
default.ckpt = 3
default.models_root = "./models"
default.prefix = None
default.extra_model_name = None  # insightface train_parall.py: runs go to MODELS_ROOT/NET-LOSS-DATASET-NAME/
default.target = None  # None: the dataset's val_targets
default.ctx = None
default.seed = 0
default.resume = None
# fine-tuning
default.fc7_name = "fc7"
default.reset_fc7 = False
default.allow_missing = False
default.fc7_init = "random"
default.freeze_steps = 0
default.head_lr_mult = 1.0  # lr factor of the --freeze-steps head stage; --stages writes it as head:N@F
default.stages = None
default.stage_warmup = 0  # batches of linear lr ramp at the start of each stage after the first
default.frozen_stages = 0
default.backbone_lr_mult = 1.0
default.bn_mode = "train"
default.bn_wd = False
default.eval_pretrained = False
default.source_targets = None  # comma list of --target names whose pretrained accuracy is watched ('kept')
default.max_source_drop = None
default.stop_on_source_drop = False
default.verify_backend = "auto"  # engine of verification during training (recognition.verification.BACKENDS)
# triplet refinement with offline mining (recognition.triplet_mining) and distillation (recognition.distill)
default.mining_interval = 0
default.bag_identities = 20
default.teacher = None
default.distill_loss = None
default.distill_weight = None
default.teacher_cache = None


def base_tree() -> edict:
    """A deep copy of the whole default tree: ``{config, network, dataset, loss, default}``."""
    return edict(copy.deepcopy({"config": dict(config), "network": dict(network), "dataset": dict(dataset),
                                "loss": dict(loss), "default": dict(default)}))


def known_keys(tree: Optional[edict] = None) -> set:
    """Flat keys a run understands: global knobs, flag defaults and every section's keys and LossConfig fields."""
    tree = tree or base_tree()
    keys = set(tree.config) | set(tree.default) | set(LOSS_FIELDS)
    keys |= {"loss", "dataset_path"}
    for sec in SECTIONS:
        for entry in tree[sec].values():
            keys |= set(entry)
    return keys


def load_config_file(path: str) -> dict:
    """Read a ``--config`` file (.json, .yaml/.yml, .py with a ``config`` dict) into a plain dict."""
    if not os.path.isfile(path):
        raise ToolkitError(f"--config: file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            with open(path) as f:
                data = json.load(f)
        elif ext in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ToolkitError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml)") from None
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        elif ext == ".py":
            ns = runpy.run_path(path)
            data = ns.get("config")
            if data is None:
                raise ToolkitError(f"--config {path}: a .py config must define a dict named 'config'")
            if any(isinstance(ns.get(sec), dict) for sec in SECTIONS + ("default",)):
                # insightface's sample_config.py layout: module-level config/network/dataset/loss/default
                data = {"config": dict(data), **{sec: dict(ns[sec]) for sec in SECTIONS + ("default",)
                                                 if isinstance(ns.get(sec), dict)}}
        else:
            raise ToolkitError(f"--config {path}: unknown extension {ext!r}; use .json, .yaml, .yml or .py")
    except ToolkitError:
        raise
    except Exception as exc:  # syntax errors in the user's file: one line
        raise ToolkitError(f"--config {path}: cannot read it ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ToolkitError(f"--config {path}: top level must be a mapping, got {type(data).__name__}")
    return dict(data)


def parse_value(text: str):
    """``--set`` value: JSON when it parses (numbers, true/false/null, lists), else the raw string."""
    try:
        return json.loads(text)
    except ValueError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        return text


def _translate(key: str, value, where: str, known: set, section: Optional[str] = None):
    """One key of a file or ``--set`` in our terms: ``(key, value)``, or None when it is to be skipped.

    insightface's names are mapped (:data:`INSIGHTFACE_KEYS`); descriptive keys are checked against the section
    they sit in; keys with no effect here are skipped with one log line in a file and refused by ``--set``."""
    key = INSIGHTFACE_KEYS.get(key, key)
    if key == "image_size" and isinstance(value, (list, tuple)) and len(value) == 3:
        value = tuple(value[:2])  # insightface's image_shape is (H, W, C)
    if key == "data_cutoff" and isinstance(value, bool):
        value = int(value)  # sample_config.py writes config.data_cutoff = False
    if key in _DESCRIPTIVE:
        _check_descriptive(key, value, section, where)
        return None
    if key in known:
        return key, value
    if key in IGNORED_FILE_KEYS and not where.startswith("--set"):
        logger.warning("%s: key %r skipped: %s", where, key, IGNORED_FILE_KEYS[key])
        return None
    if key in IGNORED_FILE_KEYS:
        raise ToolkitError(f"{where}: key {key!r} has no effect here ({IGNORED_FILE_KEYS[key]})")
    raise ToolkitError(f"{where}: unknown key {key!r}")


def _check_descriptive(key: str, value, section: Optional[str], where: str) -> None:
    """``net_name``/``num_layers``/``loss_name`` must agree with the network/loss the section is named after."""
    if section is None:
        return
    kind, name = section
    if key == "num_layers" and kind == "network" and name.startswith("r") and name[1:].isdigit():
        if int(value) != int(name[1:]):
            raise ToolkitError(f"{where}: network.{name}.num_layers={value} contradicts the name {name}")
    elif key == "net_name" and kind == "network":
        from recognition.backbones import NETWORKS

        family = NETWORKS[name].family if name in NETWORKS else None
        if family is not None and family != value:
            raise ToolkitError(f"{where}: network.{name}.net_name={value!r} but {name} is a {family} network here")
    elif key == "loss_name" and kind == "loss":
        wanted = {"softmax": "softmax", "triplet": "triplet", "atriplet": "atriplet"}.get(name, "margin_softmax")
        if value != wanted:
            raise ToolkitError(f"{where}: loss.{name}.loss_name={value!r}; {name} is {wanted!r} in insightface")


def _split_overrides(tree: edict, data: dict, where: str, known: set) -> dict:
    """Merge section entries of ``data`` into ``tree``; return its flat keys (checked against ``known``)."""
    flat = {}
    for key, value in data.items():
        if key in SECTIONS or key in ("config", "default"):
            if not isinstance(value, dict):
                raise ToolkitError(f"{where}: section {key!r} must be a mapping")
            for name, entry in value.items():
                if key in ("config", "default"):
                    item = _translate(name, entry, where, known)
                    if item:
                        tree[key][item[0]] = item[1]
                elif isinstance(entry, dict):
                    section = tree[key].setdefault(name, edict())
                    for sub, sub_value in entry.items():
                        item = _translate(sub, sub_value, where, known, (key, name))
                        if item:
                            section[item[0]] = item[1]
                else:
                    raise ToolkitError(f"{where}: {key}.{name} must be a mapping")
        else:
            item = _translate(key, value, where, known)
            if item:
                flat[item[0]] = item[1]
    return flat


def parse_sets(items: Iterable[str], known: set) -> dict:
    """``["lr=0.01", "loss.arcface.margin_m=0.45"]`` -> nested dict understood by :func:`_split_overrides`."""
    out: dict = {}
    for item in items or ():
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ToolkitError(f"--set {item!r}: expected KEY=VALUE (e.g. lr=0.01 or loss.arcface.margin_m=0.45)")
        parts = key.split(".")
        if len(parts) == 1:
            if INSIGHTFACE_KEYS.get(key, key) not in known:
                raise ToolkitError(f"--set {item!r}: unknown key {key!r}")
            out[key] = parse_value(raw)
        elif len(parts) == 3 and parts[0] in SECTIONS:
            out.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = parse_value(raw)
        elif len(parts) == 2 and parts[0] in ("config", "default"):
            out.setdefault(parts[0], {})[parts[1]] = parse_value(raw)
        else:
            raise ToolkitError(f"--set {item!r}: dotted keys are SECTION.NAME.KEY (sections: {', '.join(SECTIONS)})"
                               f" or config.KEY/default.KEY")
    return out


def resolve_config(cli: dict, config_file: Optional[str] = None, sets: Iterable[str] = (),
                   base: Optional[dict] = None, script_defaults: Optional[dict] = None) -> edict:
    """One flat easydict for a run.

    ``cli``: explicit flag values (``None`` = not given). ``base``: a saved flat config to start from (resume),
    which replaces the tree's defaults. ``script_defaults``: a script's own defaults (train_softmax.py's), above
    the tree's sections and below ``--config``, flags and ``--set``. Returns the flat config; ``cfg.loss_kwargs``
    holds the LossConfig fields for :func:`recognition.objectives.make_loss_config`.
    """
    script_defaults = dict(script_defaults or {})
    tree = base_tree()
    known = known_keys(tree)
    file_flat = _split_overrides(tree, load_config_file(config_file), f"--config {config_file}", known) \
        if config_file else {}
    set_flat = _split_overrides(tree, parse_sets(sets, known), "--set", known)
    given = {k: v for k, v in cli.items() if v is not None}

    def pick(key):
        for layer in (set_flat, given, file_flat):
            if key in layer:
                return layer[key]
        if base:
            return base.get(key, tree.default.get(key))
        return script_defaults.get(key, tree.default.get(key))

    net, ds, loss_name = pick("network"), pick("dataset"), pick("loss")
    explicit_data = any("data_dir" in layer for layer in (set_flat, given, file_flat))
    explicit_ds = any("dataset" in layer for layer in (set_flat, given, file_flat))
    if explicit_data and not explicit_ds and not base:
        # --data-dir alone: the folder names the dataset; no config section (and its class count) applies
        ds = os.path.basename(os.path.normpath(pick("data_dir")))
    flat = edict()
    if base:
        flat.update(copy.deepcopy(base))
    else:
        flat.update(tree.config)
        flat.update(tree.default)
        flat.update(tree.network.get(net, {}))
        if ds in tree.dataset:
            flat.update(tree.dataset[ds])
        flat.update(tree.loss.get(loss_name, {}))
        flat.update(script_defaults)
    flat.update(file_flat)
    flat.update(given)
    flat.update(set_flat)
    if flat.get("pretrained") and not base and not any("emb_size" in layer for layer in (set_flat, given, file_flat)):
        # no --emb-size: the checkpoint's width wins over the network section's default (r100 says 512; taking it
        # would re-create a 128-d checkpoint's embedding layer and throw its training away)
        flat.emb_size = None
    flat.network, flat.dataset, flat.loss = net, ds, loss_name
    flat.loss_kwargs = {k: flat[k] for k in LOSS_FIELDS if k in flat and flat[k] is not None}
    return flat


__all__ = ["config", "network", "dataset", "loss", "default", "base_tree", "known_keys", "load_config_file",
           "parse_sets", "parse_value", "resolve_config"]
