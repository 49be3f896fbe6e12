"""``python -m moe.train`` runs the same Hydra app as ``moe-train``."""

from moe.train import main

main()
