"""A tiny moe-train run, trained in-process on one stdlib file, with the ``.hydra/config.yaml`` the CLI writes."""

import sysconfig
from pathlib import Path

from omegaconf import OmegaConf

from moe.train import train, validate
from moe.train.config import to_dict

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py"


def tokenised_corpus(root: Path) -> tuple[Path, int]:
    """``CORPUS`` tokenised by a small byte-level BPE trained on it: ``root/tokens/train.bin`` (uint16) next to
    its ``tokenizer.json``; returns the .bin path and the vocabulary size."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = root / "tokens"
    folder.mkdir()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(CORPUS)], trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = tokenizer.encode(CORPUS.read_text()).ids
    np.asarray(ids, dtype=np.uint16).tofile(folder / "train.bin")
    return folder / "train.bin", tokenizer.get_vocab_size()


def tiny_config(root: Path, router: str = "topk", data: dict | None = None, trainer: dict | None = None, **model):
    """2 layers, width 32, seq_len 48, 3 steps on the bytes of ``CORPUS``; ``data``, ``trainer`` and ``model``
    override keys of their groups."""
    corpus = root / "corpus.txt"
    corpus.write_bytes(CORPUS.read_bytes())
    return validate(
        OmegaConf.create(
            {
                "model": {
                    "seq_len": 48,
                    "num_layers": 2,
                    "hidden_size": 32,
                    "num_heads": 2,
                    "ffn_hidden_size": 32,
                    **model,
                },
                "router": {"name": router},
                "data": {
                    "source": "text",
                    "path": str(corpus),
                    "cache_dir": str(root / "cache"),
                    "batch_size": 4,
                    **(data or {}),
                },
                "optim": {"warmup_steps": 1},
                "trainer": {"max_steps": 3, "eval_interval": 0, "device": "cpu", "threads": 1, **(trainer or {})},
                "logger": {"progress": "lines"},
            }
        )
    )


def train_run(root: Path, router: str = "topk", **overrides) -> Path:
    """Train ``tiny_config(root, router, **overrides)`` in-process; write the ``.hydra/config.yaml`` the CLI would."""
    cfg = tiny_config(root, router, **overrides)
    run_dir = root / "run"
    train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(to_dict(cfg)), run_dir / ".hydra" / "config.yaml")
    return run_dir
