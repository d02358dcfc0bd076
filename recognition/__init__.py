"""insightface-compatible face recognition training and fine-tuning on MXNet.

Importing this package starts nothing. It only sets ``MXNET_SUBGRAPH_BACKEND=NONE`` unless the user chose a
value: MXNet 1.9.1's MKLDNN subgraph pass fails on some real checkpoints at ``asnumpy()``
("We can't generate TBlob for MKLDNN data"), and the plain MKLDNN operators stay on without it.
"""
import os

os.environ.setdefault("MXNET_SUBGRAPH_BACKEND", "NONE")

__version__ = "0.1.0"
