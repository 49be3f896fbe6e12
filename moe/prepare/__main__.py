"""``python -m moe.prepare`` = ``moe-prepare``."""

from moe.prepare import main

main()
