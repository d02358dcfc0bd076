"""insightface-compatible face recognition training and fine-tuning on MXNet.

Importing this package starts nothing (MXNet is not imported). It sets ``MXNET_SUBGRAPH_BACKEND=NONE`` unless the
user chose a value: MXNet 1.9.1's MKLDNN subgraph pass fails on some real checkpoints at ``asnumpy()``
("We can't generate TBlob for MKLDNN data"), and the plain MKLDNN operators stay on without it. And it keeps
the output quiet (:mod:`recognition.quiet`): MXNet's INFO lines about that setting and about upgrading older
symbol files, and third-party deprecation warnings, are filtered unless ``IFR_VERBOSE=1`` (``-v``).
"""
import os

os.environ.setdefault("MXNET_SUBGRAPH_BACKEND", "NONE")

from recognition import quiet as _quiet  # noqa: E402  (after the environment: it may patch an imported mxnet)

_quiet.install()  # MXNet's INFO chatter and third-party DeprecationWarnings filtered unless IFR_VERBOSE=1 (-v)

__version__ = "0.1.0"
