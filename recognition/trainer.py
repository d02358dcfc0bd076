"""The training loop shared by ``train.py``, ``train_softmax.py`` (and ``train_parall.py``).

:func:`recognition.run_plan.prepare_run` checks everything a run needs (data, classes, targets, checkpoint,
devices) before any compute; :class:`Trainer` then steps a ``mx.mod.Module`` over all devices (data parallel, batch =
per-batch-size x devices) through the stage schedule (``head`` -> ``all``), verifying on ``--target`` every
``--verbose`` batches, saving by the ``--ckpt`` policy and always at the end, with a resume state next to it.

Per-parameter multipliers: an optimizer instance handed to ``Module.init_optimizer`` ignores the graph's
``lr_mult`` attributes (no ``sym`` given; insightface's train.py ran with fc7_lr_mult silently at 1). Here the
optimizer gets explicit ``set_lr_mult``/``set_wd_mult`` dicts from :func:`recognition.freeze.param_multipliers`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from typing import Dict, Optional

import mxnet as mx
import numpy as np

from recognition.backbones import convert_prelu, fill_unit_aux, get_symbol
from recognition.backbones.fast_prelu import count_prelu
from recognition.checkpoints import CheckpointPolicy, prune_checkpoints, save_model, synced_params
from recognition.common import (
    ToolkitError,
    atomic_write,
    remove_stale_temps,
    save_params_atomic,
    setup_logging,
    symbol_graph,
)
from recognition.freeze import param_multipliers, stage_at, stage_plan, stage_symbol, stage_table_for
from recognition.image_iter import FaceImageIter
from recognition.launch import DIST_KVSTORES, worker_exit_on_error, worker_kvstore
from recognition.metrics_log import MetricsLog, Window, read_metrics
from recognition.objectives import DataSpec
from recognition.pretrained import imprint_fc7, load_pretrained
from recognition.resume_state import (
    StopFlag,
    get_optimizer_states,
    load_resume_arrays,
    save_resume,
    set_optimizer_states,
    set_rng_state,
)
from recognition.run_plan import RunPlan, lr_at, prepare_run  # noqa: F401  (re-exported)
from recognition.thresholds import operating_points, record_thresholds
from recognition.train_verifier import Verifier
from recognition.verification import Embedder, make_embedder

logger = logging.getLogger("recognition")


def _first_missing(path: str) -> Optional[str]:
    """The topmost folder of ``path`` that does not exist yet (what ``os.makedirs(path)`` would create), or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _has_random_ops(symbol) -> bool:
    ops = {n["op"] for n in symbol_graph(symbol)["nodes"]}
    return any(op == "Dropout" or op.startswith(("_random", "_sample")) for op in ops)


class Trainer:
    """One training run: ``Trainer(cfg, plan).fit() -> dict`` (final results, checkpoint path).

    Reads every setting from ``plan`` (:class:`recognition.run_plan.RunPlan`, never changed); ``cfg`` is the flat
    configuration it was made from (kept as ``self.cfg`` for callers; ``plan.config`` is what is saved).

    Hooks for subclasses (``train_parall.py``): :meth:`_make_module` (the module of a stage and its optimizer
    handle: anything with ``forward_backward``/``update``/``get_params``/``set_params``/``get_outputs``),
    :meth:`optimizer_states`/:meth:`load_optimizer_states` (``{param_name: state}`` of that module) and
    :meth:`_batch_metrics`; :meth:`embedder` gives an embedder of the current parameters.
    """

    def __init__(self, cfg, plan):
        self.cfg, self.plan = cfg, plan
        self.ctx = plan.ctx
        self.fc7_name = plan.fc7_name
        self.kv = worker_kvstore(plan.kvstore) if plan.kvstore in DIST_KVSTORES else None
        self.rank, self.num_workers = (self.kv.rank, self.kv.num_workers) if self.kv else (0, 1)
        # rank 0 verifies and writes checkpoints/resume state; the others log to their own folder
        self.run_dir = plan.run_dir if self.rank == 0 else os.path.join(plan.run_dir, f"worker{self.rank}")
        made = _first_missing(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        try:
            self._setup()
        except BaseException:
            if made:  # a run that fails before its first step leaves no half-made run folder behind
                shutil.rmtree(made, ignore_errors=True)
            raise

    def _setup(self) -> None:
        """Logging, metrics, graph, data, verifier, resume state and ``config.json`` of a new Trainer."""
        plan = self.plan
        setup_logging(log_file=os.path.join(self.run_dir, "train.log"))
        # a killed run leaves .NAME.XXXX.tmp files (never real names: those only appear by rename); drop them
        stale = remove_stale_temps(self.run_dir) + remove_stale_temps(os.path.join(self.run_dir, "resume"))
        if stale:
            logger.warning("removed %d unfinished temporary file(s) of an interrupted run: %s", len(stale),
                           ", ".join(stale[:4]) + (" ..." if len(stale) > 4 else ""))
        self.metrics = MetricsLog(os.path.join(self.run_dir, "metrics.jsonl"))
        self.curves = os.path.join(self.run_dir, "curves.png")
        self.policy = CheckpointPolicy(plan.ckpt)
        self.step, self.msave, self.stage_idx = 0, 0, 0
        self.last_ckpt: Optional[str] = None
        self.before: Dict[str, float] = {}
        self.opt_states = None
        self._broadcast = False
        self._seed(plan.seed, 0)
        self._build_graph()
        self._build_data()
        self.verifier = Verifier(plan.targets if self.rank == 0 else [], self.ctx[0],
                                    batch_size=min(64, plan.per_batch_size), image_size=plan.image_size,
                                    backend=plan.verify_backend)
        if plan.resume:
            self._restore(plan.resume)
        # the flat configuration, with "network" saying what was really built (a checkpoint's own graph is not the
        # configuration's default network) and "built" the rest of what the graph and schedule turned out to be
        built = self.built()
        with atomic_write(os.path.join(self.run_dir, "config.json"), "w") as f:
            json.dump(dict(plan.config, network=built["network"], built=built), f, indent=1, sort_keys=True,
                      default=str)

    # -- setup ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _seed(seed: int, step: int) -> None:
        np.random.seed(seed)
        random.seed(seed)
        mx.random.seed(seed + step)

    def _build_graph(self) -> None:
        """Embedding graph + starting parameters (resume state, checkpoint, or none), then the training graph."""
        plan = self.plan
        self.arg_params, self.aux_params = {}, {}
        if plan.resume:
            self.embedding_symbol, self.arg_params, self.aux_params, self.opt_states = \
                load_resume_arrays(plan.resume)
            # a stock graph (older resume state) trains in the configured formulation, not the slow one
            self.embedding_symbol = convert_prelu(self.embedding_symbol, plan.prelu,
                                                  (1,) + plan.data_shape)
        elif plan.pretrained:
            pre = load_pretrained(plan.pretrained, network=plan.network if plan.network_explicit else None,
                                  emb_size=plan.emb_size, num_classes=plan.num_classes,
                                  fc7_name=self.fc7_name, reset_fc7=plan.reset_fc7,
                                  allow_missing=plan.allow_missing, prelu=plan.prelu)
            plan.objective.adapt_pretrained(pre)  # no classifier to take fc7 into: dropped, in the report
            logger.info("load report:\n%s", pre.report.format())
            pre.report.save(self.run_dir)
            self.embedding_symbol = pre.embedding_symbol
            self.arg_params = dict(pre.arg_params)
            self.arg_params.update(pre.fc7)
            self.aux_params = dict(pre.aux_params)
        else:
            self.embedding_symbol = get_symbol(plan.network, emb_size=plan.emb_size,
                                               prelu=plan.prelu, **plan.network_options)
        if plan.count_flops:  # insightface's config.count_flops: logged at train start
            from recognition.flops import log_flops

            log_flops(self.embedding_symbol, plan.data_shape)
        self.train_symbol, self.head_info = plan.objective.build_symbol(self.embedding_symbol, plan.num_classes,
                                                                        self.fc7_name)
        if self.arg_params or self.aux_params:  # prelu='bn': its constant unit states are never loaded, only filled
            self.aux_params = fill_unit_aux(self.embedding_symbol, self.aux_params)
        layers = count_prelu(self.embedding_symbol)
        if layers["bn"] or layers["stock"]:
            logger.info("PReLU layers: %d bn, %d stock (prelu=%s)", layers["bn"], layers["stock"], plan.prelu)
        self._random_graph = _has_random_ops(self.train_symbol)
        self.stage_table = stage_table_for(plan.graph_network, self.embedding_symbol.list_arguments())

    def _build_data(self) -> None:
        """The training iterator the objective needs (shuffled images, identity groups, mined triplets, + teacher)."""
        plan = self.plan
        spec = DataSpec(os.path.join(plan.data_dir, "train.rec"), plan.batch_size, plan.data_shape,
                        rand_mirror=plan.data_rand_mirror, cutoff=plan.data_cutoff, augment=plan.data_augment,
                        color_jitter=plan.data_color,
                        images_filter=plan.data_images_filter,
                        num_workers=plan.num_workers, seed=plan.seed, num_parts=self.num_workers,
                        part_index=self.rank, num_devices=len(self.ctx))
        self.data = plan.objective.make_data(spec)

    def _restore(self, doc: dict) -> None:
        self.step, self.msave = int(doc["step"]), int(doc["msave"])
        self.policy.highest = list(doc["highest"])
        self.policy.saved_best = bool(doc["saved_best"])
        # the last checkpoint as it is named in this (possibly moved) run folder
        last = doc.get("last_ckpt")
        self.last_ckpt = os.path.join(self.run_dir, os.path.basename(last)) if last else None
        self.before = doc.get("before", {})
        self.data.set_state(doc["iter_state"])
        self._seed(self.plan.seed, self.step)
        set_rng_state(doc["rng"])
        self.metrics.truncate_after(self.step)
        logger.info("resumed %s at step %d (epoch %d)", doc["dir"], self.step, doc["iter_state"]["epoch"])

    def _make_module(self, stage_idx: int, arg: dict, aux: dict):
        """Bind a Module for stage ``stage_idx``: its fixed parameters, frozen BatchNorms and multipliers."""
        plan = self.plan
        stage = self.plan.stages[stage_idx]
        fixed, frozen_bn = stage_plan(self.train_symbol, stage, self.stage_table, plan.frozen_stages,
                                      self.fc7_name, plan.bn_mode)
        symbol = stage_symbol(self.train_symbol, stage, frozen_bn)  # + no Dropout in 'head' (freeze.py)
        inputs = ["data"] + [d.name for d in self.data.provide_label]  # softmax_label (+ teacher_emb)
        mod = mx.mod.Module(symbol, data_names=["data"], label_names=inputs[1:], context=self.ctx,
                            fixed_param_names=fixed)
        mod.bind(data_shapes=self.data.provide_data, label_shapes=self.data.provide_label, for_training=True)
        wanted = [n for n in symbol.list_arguments() if n not in inputs]
        missing = [n for n in wanted if n not in arg] + \
            [n for n in symbol.list_auxiliary_states() if n not in aux]
        if missing and (arg or aux):
            logger.info("initialised fresh: %s", ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else ""))
        init = mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2)
        mod.init_params(init, arg_params=arg or None, aux_params=aux or None, allow_missing=True, allow_extra=True)
        # SoftmaxOutput(normalization='valid') already averages per device; the kvstore sums devices (and, with
        # dist_sync, workers): the update is that of one process with the global batch
        opt = mx.optimizer.SGD(learning_rate=plan.lr, momentum=plan.mom, wd=plan.wd,
                               rescale_grad=1.0 / (len(self.ctx) * self.num_workers))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Module warns that rescale_grad differs from 1/batch (intended)
            mod.init_optimizer(kvstore=self.kv or self.plan.kvstore, optimizer=opt)
        if self.kv is not None and not self._broadcast:  # every worker starts from rank 0's parameters
            names = mod._exec_group.param_names
            for i, arrays in enumerate(mod._exec_group.param_arrays):
                self.kv.pull(names[i], out=arrays, priority=-i)
            mx.nd.waitall()
            mod._params_dirty = True
            self._broadcast = True
        # graph attributes count once: fc7's own lr/wd attrs are the fc7 flags themselves
        attrs = {k: v for k, v in self.train_symbol.attr_dict().items() if k not in self.head_info["fc7_params"]}
        lr_mult, wd_mult = param_multipliers(wanted, self.fc7_name, plan.fc7_lr_mult, plan.fc7_wd_mult,
                                             plan.backbone_lr_mult, plan.bn_wd, attr_dict=attrs)
        opt.set_lr_mult(lr_mult)
        opt.set_wd_mult(wd_mult)
        self.trained = set(wanted) - set(fixed)
        logger.info("stage %s: %d parameters train, %d fixed, %d BatchNorms frozen", stage.name,
                    len(self.trained), len(fixed), len(frozen_bn))
        return mod, opt

    def _switch(self, stage_idx: int) -> None:
        """Rebuild the Module for a new stage, carrying parameters and optimizer states of trained params."""
        arg, aux = synced_params(self.module)
        states = self.optimizer_states()
        before = set(self.trained)
        self.module, self.opt = self._make_module(stage_idx, arg, aux)
        if states:
            self.load_optimizer_states(states, before & self.trained)
        self.stage_idx = stage_idx

    def optimizer_states(self) -> Optional[dict]:
        """Hook: ``{param_name: state}`` of the current module's optimizer (None: on a parameter server)."""
        return get_optimizer_states(self.module)

    def load_optimizer_states(self, states: dict, names: set) -> None:
        """Hook: install ``states`` (``{param_name: state}``) for the parameters in ``names``."""
        set_optimizer_states(self.module, states, names=names)

    def _init_fc7(self) -> None:
        """``--fc7-init imprint``: fc7 rows = normalised class means of the starting backbone's embeddings."""
        weight = f"{self.fc7_name}_weight"
        if self.plan.fc7_init != "imprint" or weight in self.arg_params or weight not in self.head_info["fc7_params"]:
            return
        arg, aux = synced_params(self.module)
        # the engine of verification (--verify-backend): onnx on CPU embeds 1.5x faster than the MXNet graph
        embed = make_embedder(self.embedding_symbol, arg, aux, self.ctx[0], self.plan.per_batch_size,
                              self.plan.data_shape, self.plan.verify_backend)
        rec = os.path.join(self.plan.data_dir, "train.rec")
        # the iterator drops a last partial batch: pick a batch size dividing the image count so every image counts
        n = self.data.num_images
        bs = max(b for b in range(1, min(n, 64) + 1) if n % b == 0)
        it = FaceImageIter(rec, bs, data_shape=self.plan.data_shape, shuffle=False, rand_mirror=False,
                           num_workers=self.plan.num_workers, seed=0)
        w = imprint_fc7(embed, it, self.plan.num_classes, total=n)
        it.close()
        arg = dict(arg)
        arg[weight] = mx.nd.array(w)
        self.module.set_params(arg, aux, allow_missing=False, allow_extra=False)
        logger.info("fc7 imprinted from %d class means (%s)", w.shape[0], "x".join(map(str, w.shape)))

    def embedder(self):
        """Hook: an ``Embedder`` of the current parameters, (N, 3, H, W) float32 -> (N, E) ``fc1_output``."""
        arg, aux = self.module.get_params()
        return Embedder(self.embedding_symbol, arg, aux, ctx=self.ctx[0],
                        batch_size=min(64, self.plan.per_batch_size), data_shape=self.plan.data_shape)

    # -- steps ---------------------------------------------------------------------------------------------------
    def _batch_metrics(self, batch):
        """``(loss, acc or None, extra)`` of the forward pass just run (merged over devices)."""
        outs = self.module.get_outputs(merge_multi_context=True)
        if self.head_info["metric"] == "acc":
            prob = outs[0].asnumpy()
            label = batch.label[0].asnumpy().astype(np.int64)
            p = prob[np.arange(len(label)), label]
            loss = float(np.mean(-np.log(np.maximum(p, 1e-30))))
            acc = float(np.mean(prob.argmax(axis=1) == label))
            extra = {name: float(o.asnumpy().mean()) for name, o in zip(self.head_info["outputs"][2:], outs[2:])}
            return loss + sum(extra.values()), acc, extra
        return float(outs[0].asnumpy().mean()), None, {}

    def _acc_nomargin(self, batch, acc: Optional[float]) -> Optional[float]:
        """Training accuracy without the margin: argmax over classes of cos(embedding, fc7 row) vs the label.

        From the forward pass just run (the ``<emb>_emb`` output, all devices) and fc7 as it was in that pass
        (device 0's copy, read before the update), on device. None without a single fc7 (triplet, model parallel);
        ``acc`` itself for plain softmax, whose logits carry no margin.
        """
        if acc is None or self.head_info["metric"] != "acc" or not self.head_info["outputs"][1].endswith("_emb_output"):
            return None
        if self.plan.objective.plain_logits:
            return acc
        group = getattr(self.module, "_exec_group", None)  # a model-parallel module has no single fc7 copy
        weight = f"{self.fc7_name}_weight"
        if group is None or weight not in group.param_names:
            return None
        w = group.param_arrays[group.param_names.index(weight)][0]
        emb = self.module.get_outputs(merge_multi_context=True)[1].as_in_context(w.context)
        cos = mx.nd.dot(mx.nd.L2Normalization(emb, mode="instance"), mx.nd.L2Normalization(w, mode="instance"),
                        transpose_b=True)
        pred = mx.nd.argmax(cos, axis=1).asnumpy().astype(np.int64)
        return float(np.mean(pred == batch.label[0].asnumpy().astype(np.int64)))

    def _verify(self, arg, aux) -> Dict[str, dict]:
        results = self.verifier(self.embedding_symbol, arg, aux)
        for name, r in results.items():
            logger.info("[%s][%d]XNorm: %f", name, self.step, r["xnorm"])
            logger.info("[%s][%d]Accuracy-Flip: %1.5f+-%1.5f", name, self.step, r["acc"], r["std"])
            self.metrics.write("verify", step=self.step, target=name, acc=float(r["acc"]), std=float(r["std"]),
                               xnorm=float(r["xnorm"]))
        self._watch_source(results)
        return results

    def built(self) -> dict:
        """What this run really built: ``network`` (registry name or ``checkpoint graph of PREFIX,EPOCH``),
        ``emb_size``, ``prelu`` (training formulation and layer counts; checkpoints store the stock graph), ``loss``,
        ``num_classes``, ``fc7_name`` and ``stages`` (name, steps or None = to the end, lr factor)."""
        plan = self.plan
        layers = count_prelu(self.embedding_symbol)
        emb = int(self.embedding_symbol.infer_shape(data=(1,) + plan.data_shape)[1][0][1])
        return dict(network=plan.network_built, emb_size=emb, loss=plan.loss, num_classes=plan.num_classes,
                    fc7_name=self.fc7_name, pretrained=plan.pretrained or plan.config.get("pretrained"),
                    prelu={"formulation": plan.prelu, "bn_layers": layers["bn"], "stock_layers": layers["stock"]},
                    stages=[{"name": s.name, "steps": s.steps, "lr_mult": s.lr_mult} for s in plan.stages])

    def _watch_source(self, results: Dict[str, dict]) -> None:
        """``--source-targets``: log how much of the pretrained accuracy each source target keeps; past
        ``--max-source-drop`` warn (and with ``--stop-on-source-drop`` stop gracefully after this round)."""
        plan = self.plan
        for name in plan.source_targets:
            if name not in results or name not in self.before:  # the round before training sets ``before``
                continue
            before, acc = self.before[name], float(results[name]["acc"])
            change = acc - before
            self.metrics.write("kept", step=self.step, target=name, before=before, acc=acc, change=change)
            # accuracies are counts over pairs: a drop of exactly the margin (0.99083 -> 0.98583 on 1,200 pairs)
            # differs from it by float rounding only and stays within it
            if plan.max_source_drop is None or -change <= plan.max_source_drop + 1e-9:
                continue
            logger.warning("[%s][%d] source target fell %.5f below the pretrained model (%.5f -> %.5f; "
                           "--max-source-drop %g)%s", name, self.step, -change, before, acc, plan.max_source_drop,
                           "; stopping" if plan.stop_on_source_drop else "")
            self.metrics.write("source_drop", step=self.step, target=name, before=before, acc=acc, change=change)
            if plan.stop_on_source_drop:
                self._stop.request(f"--max-source-drop ({name} {change:+.5f})")

    def _meta(self) -> dict:
        return self.built()

    def _save(self, epoch: int, results: Optional[Dict[str, dict]] = None) -> Optional[str]:
        """Checkpoint ``epoch``; ``results`` (this round's verification) also go to ``PREFIX-meta.json`` as the
        model's cosine thresholds (``recognition/thresholds.py``: compare, search and the server read them)."""
        if self.rank > 0:
            return None
        try:
            path = save_model(self.plan.prefix, epoch, self.module, self.train_symbol, self.embedding_symbol,
                                 slim=self.plan.ckpt_embedding, meta=self._meta())
            points = {name: operating_points(r["embeddings"], r["issame"], r["best_threshold"],
                                             r["best_threshold_acc"])
                      for name, r in (results or {}).items() if "issame" in r}
            if points:
                record_thresholds(self.plan.prefix, points)
        except ToolkitError as exc:  # disk full / unwritable: earlier checkpoints are untouched (atomic writes)
            raise ToolkitError(f"{exc}; last good checkpoint: {self.last_ckpt or 'none saved yet'}") from None
        self.last_ckpt = path
        keep = self.plan.keep
        for old in prune_checkpoints(self.plan.prefix, keep, protect=(1,) if self.plan.ckpt == 3 else ()):
            logger.info("removed %s (--keep %d)", old, keep)
        self.metrics.write("checkpoint", step=self.step, epoch=epoch, path=path)
        logger.info("saved %s", path)
        return path

    def _round(self, final: bool = False) -> Dict[str, dict]:
        """Verification round ``msave``: verify, checkpoint by policy (always when ``final``), resume state, PNG."""
        self.msave += 1
        arg, aux = synced_params(self.module)
        results = self._verify(arg, aux)
        epoch = self.policy.decide([float(r["acc"]) for r in results.values()], self.msave)
        if epoch is None and final:
            epoch = self.policy.final_epoch(self.msave)
        if epoch is not None:
            self._save(epoch, results)
        if results:
            logger.info("[%d]Accuracy-Highest: %1.5f", self.step, self.policy.highest[1])
        self._save_resume()
        self.metrics.plot(self.curves)
        self._last_round = (self.step, epoch is not None)
        return results

    def _save_resume(self) -> None:
        if self.rank > 0:  # all workers resume from rank 0's state (same parameters, optimizer states, cursor)
            return
        state = dict(msave=self.msave, highest=self.policy.highest, saved_best=self.policy.saved_best,
                     stage_index=self.stage_idx, iter_state=self.data.get_state(), last_ckpt=self.last_ckpt,
                     before=self.before, config={k: v for k, v in self.plan.config.items() if k != "resume"})
        try:
            save_resume(self.run_dir, self.step, self.module, self.embedding_symbol, state,
                        optimizer_states=self.optimizer_states())
        except ToolkitError as exc:
            raise ToolkitError(f"{exc}; the previous resume state in {self.run_dir}/resume is intact") from None

    def _diverged(self, loss: float, lr: float) -> None:
        stage = self.plan.stages[self.stage_idx].name
        self.metrics.write("diverged", step=self.step + 1, loss=loss, lr=lr, stage=stage)
        self.metrics.close()
        raise ToolkitError(f"training diverged: loss is {loss} at step {self.step + 1} (stage {stage}, lr {lr:g}); "
                           f"stopped before that update; last good checkpoint: {self.last_ckpt or 'none saved yet'}"
                           f"; lower --lr or add --warmup-steps")

    def fit(self) -> dict:
        """Train to ``max_total`` steps or ``--end-epoch``; returns ``{step, final, before, checkpoint}``.

        SIGINT/SIGTERM stop gracefully after the current step: resume state written, ``stopped`` in the summary.
        """
        self._stop = StopFlag()
        try:
            return self._fit()
        finally:
            self._stop.restore()

    def _stopped(self, t0: float) -> dict:
        """Graceful stop: the resume state at the current step (no verification round), then the summary."""
        if self._last_round[0] != self.step:
            self._save_resume()
        self.metrics.write("stopped", step=self.step, signal=self._stop.name)
        self.data.close()
        self.metrics.close()
        logger.warning("stopped by %s at step %d; resume state saved; continue with --resume %s", self._stop.name,
                       self.step, self.run_dir)
        return dict(step=self.step, final={}, before=self.before, checkpoint=self.last_ckpt, prefix=self.plan.prefix,
                    run_dir=self.run_dir, seconds=time.time() - t0, stopped=self._stop.name)

    def _fit(self) -> dict:
        plan = self.plan
        self.stage_idx = stage_at(plan.stages, self.step)[0]
        self.module, self.opt = self._make_module(self.stage_idx, self.arg_params, self.aux_params)
        if self.opt_states:
            self.load_optimizer_states(self.opt_states, self.trained)
        self._last_round = (-1, False)
        plan.objective.start(self.data, self.embedder, self.metrics)  # offline mining embeds its bags with it
        if not plan.resume:
            self._init_fc7()
            if plan.eval_pretrained and self.verifier:
                self.before = {k: float(r["acc"]) for k, r in self._verify(*synced_params(self.module)).items()}
        window = Window(plan.batch_size)
        end_epoch = plan.end_epoch
        logger.info("training %s: batch %d on %d device(s), %s%s", plan.prefix, plan.batch_size, len(self.ctx),
                    ", ".join(f"{s.name}:{s.steps or 'end'}" + (f"@{s.lr_mult:g}" if s.lr_mult != 1.0 else "")
                              for s in plan.stages),
                    f" (one pass over the data = {plan.pass_steps} steps)" if plan.pass_steps else "")
        t0 = time.time()
        while (plan.max_total is None or self.step < plan.max_total) and not self._stop:
            idx = stage_at(plan.stages, self.step)[0]
            if idx != self.stage_idx:
                self._switch(idx)
            try:
                batch = self.data.next()
            except StopIteration:
                if self.data.get_state()["epoch"] + 1 >= end_epoch:
                    break
                self.data.reset()
                continue
            # the stage's factor (--stages head:N@F, --head-lr-mult) times the schedule; the stage follows from the
            # step and the saved config, so a resumed run gets the same lr
            lr = plan.lr_at_step(self.step)
            self.opt.lr = lr
            if self._random_graph:
                mx.random.seed(plan.seed * 1000003 + self.step)
            self.module.forward_backward(batch)
            loss, acc, extra = self._batch_metrics(batch)
            if not math.isfinite(loss):
                self._diverged(loss, lr)
            acc_nm = self._acc_nomargin(batch, acc)
            extra_log = dict(extra, acc_nomargin=acc_nm) if acc_nm is not None else extra
            self.module.update()
            self.step += 1
            state = self.data.get_state()
            stage = plan.stages[self.stage_idx].name
            self.metrics.write("train", step=self.step, epoch=state["epoch"], stage=stage, lr=lr, loss=loss,
                               acc=acc, time=round(time.time() - t0, 3), **extra_log)
            window.add(loss, acc, acc_nm)
            if self.step % plan.frequent == 0:
                logger.info(window.report(state["epoch"], state["cursor"], lr, stage, acc is not None))
            if self.step % plan.verbose == 0:
                self._round()
        if self._stop:
            return self._stopped(t0)
        if self._last_round[0] != self.step:
            results = self._round(final=True)
        else:
            results = self._last_results() if self.verifier else {}
            if not self._last_round[1]:
                self._save(self.policy.final_epoch(self.msave))
                self._save_resume()
        self.data.close()
        self.metrics.close()
        final = {k: float(r["acc"]) if isinstance(r, dict) else float(r) for k, r in results.items()}
        if self.before:
            logger.info("verification before/after:\n%s", format_table(self.before, final))
        return dict(step=self.step, final=final, before=self.before, checkpoint=self.last_ckpt,
                    prefix=plan.prefix, run_dir=self.run_dir, seconds=time.time() - t0)

    def _last_results(self) -> Dict[str, float]:
        return {r["target"]: r["acc"] for r in read_metrics(self.metrics.path, "verify") if r["step"] == self.step}


def format_table(before: Dict[str, float], after: Dict[str, float]) -> str:
    """Two-column verification table (``before``/``after`` accuracy per target)."""
    lines = [f"{'target':<16}{'before':>10}{'after':>10}{'change':>10}"]
    for name in sorted(set(before) | set(after)):
        b, a = before.get(name), after.get(name)
        ch = f"{a - b:+.5f}" if a is not None and b is not None else "-"
        lines.append(f"{name:<16}{(f'{b:.5f}' if b is not None else '-'):>10}"
                     f"{(f'{a:.5f}' if a is not None else '-'):>10}{ch:>10}")
    return "\n".join(lines)


def run_training(cfg) -> dict:
    """Prepare (fail fast), train, and return :meth:`Trainer.fit`'s summary.

    A ``dist_*`` worker ends with ``os._exit`` on any error (:func:`recognition.launch.worker_exit_on_error`).
    With ``IFR_DIST_DUMP=DIR`` in its environment every worker also saves its final parameters to
    ``DIR/rank<R>.params`` (``arg:``/``aux:`` keys), to check that the workers agree.
    """
    plan = prepare_run(cfg)
    if plan.kvstore not in DIST_KVSTORES:
        return Trainer(cfg, plan).fit()
    with worker_exit_on_error():
        trainer = Trainer(cfg, plan)
        summary = trainer.fit()
        if os.environ.get("IFR_DIST_DUMP"):
            arg, aux = synced_params(trainer.module)
            blob = {"arg:" + k: v for k, v in arg.items()}
            blob.update({"aux:" + k: v for k, v in aux.items()})
            save_params_atomic(os.path.join(os.environ["IFR_DIST_DUMP"], f"rank{trainer.rank}.params"), blob)
        return summary


__all__ = ["prepare_run", "lr_at", "Trainer", "format_table", "run_training"]
