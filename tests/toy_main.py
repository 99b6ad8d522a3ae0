"""``python tests/toy_main.py ARGS`` = ``mdmrl ARGS`` with the test toys registered
(used by multi-process tests, where each process must register them itself)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy_plugin import TOYS  # noqa: E402

from mdmrl import plugins  # noqa: E402
from mdmrl.cli import main  # noqa: E402

plugins.get_registry().register_plugin(TOYS, "toys", "mdmrl-tests", "0")
sys.exit(main(sys.argv[1:]))
