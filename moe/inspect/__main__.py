"""``python -m moe.inspect`` = ``moe-inspect``."""

from moe.inspect import main

main()
