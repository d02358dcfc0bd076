"""One entry point for the dataset tools: ``python -m datasets.tools TOOL [args]``.

Tools: synth, align, folder2rec, rec2folder, pairs2bin, bin2images, info, shift. ``python -m datasets.tools TOOL
--help`` shows a tool's flags; each tool also runs alone (``python datasets/<tool>.py``).
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

from recognition.common import ToolkitError, run_cli

TOOLS = {
    "synth": "datasets.synth",
    "align": "datasets.align_faces",
    "folder2rec": "datasets.folder2rec",
    "rec2folder": "datasets.rec2folder",
    "pairs2bin": "datasets.pairs2bin",
    "bin2images": "datasets.bin2images",
    "info": "datasets.rec_info",
    "shift": "datasets.shift",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        raise ToolkitError(f"unknown tool {name!r}; choose one of: {', '.join(TOOLS)}")
    return importlib.import_module(TOOLS[name]).main(rest)


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
