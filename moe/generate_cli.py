"""``moe-generate``: sample text from a ``moe-train`` run directory or checkpoint file.

Settings are ``key=value`` arguments (the keys of ``GenerateConfig``), as for ``moe-train``::

    moe-generate source=outputs/<date>/<time> prompt='def ' prompt='class ' max_new_tokens=48 temperature=0
    moe-generate source=outputs/<date>/<time> prompts='[def ,class ]' temperature=0

``prompt=TEXT`` (repeatable) takes TEXT verbatim, trailing spaces included; ``prompts=`` is parsed as a
value (YAML-style: a list, and surrounding whitespace is dropped).

Prints each prompt followed by its continuation, decoded with the run's tokenizer (bytes for byte-level
runs, invalid UTF-8 shown as U+FFFD).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from moe.cli_args import parse_key_values
from moe.generate import check_sampling, generate

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class GenerateConfig:
    """``moe-generate`` settings.

    ``source``: a run directory (newest checkpoint, else ``model.safetensors``) or a checkpoint file.
    ``prompts``: one string or a list of strings, each continued separately. ``max_new_tokens`` per prompt
    (prompt + new tokens must fit in the model's ``seq_len``). ``temperature`` 0 is greedy; ``top_k`` and
    ``top_p`` restrict sampling; ``seed`` makes it reproducible. ``device``: auto (CUDA when available), cpu, cuda.
    """

    source: str = "???"
    prompts: Any = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not isinstance(self.prompts, (list, tuple)) or not self.prompts:
            raise ValueError(f"prompts={self.prompts!r} is not valid; give a string or a non-empty list of strings")
        self.prompts = [str(p) for p in self.prompts]
        if isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is not valid; it must be an int >= 0")
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r} is not valid; valid: {list(DEVICES)}")


def pick_device(choice: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``; raises ValueError for cuda without a GPU."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; valid here: auto, cpu")
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def run_generate(gcfg: GenerateConfig) -> list[str]:
    """The continuations (text) of ``gcfg.prompts``, one per prompt."""
    from moe.train.loading import load_run, run_codec

    loaded = load_run(gcfg.source)
    codec = run_codec(loaded.cfg, loaded.run_dir)
    device = pick_device(gcfg.device)
    model = loaded.model.to(device)
    generator = torch.Generator(device=device).manual_seed(gcfg.seed)
    out = []
    for prompt in gcfg.prompts:
        ids = codec.encode(prompt)
        new = generate(
            model,
            ids,
            gcfg.max_new_tokens,
            temperature=gcfg.temperature,
            top_k=gcfg.top_k,
            top_p=gcfg.top_p,
            generator=generator,
        )
        out.append(codec.decode(new))
    return out


def parse_args(args: list[str]) -> GenerateConfig:
    """``key=value`` arguments -> a checked ``GenerateConfig`` (ValueError naming a bad key or value).

    ``prompt=TEXT`` arguments are kept verbatim (a prompt's trailing space changes its first token); they
    cannot be combined with ``prompts=``.
    """
    verbatim = [a[len("prompt=") :] for a in args if a.startswith("prompt=")]
    rest = [a for a in args if not a.startswith("prompt=")]
    if verbatim and any(a.startswith("prompts=") for a in rest):
        raise ValueError("give prompts either as prompt=TEXT (repeatable, verbatim) or as prompts=[...], not both")
    gcfg = parse_key_values(GenerateConfig, rest)
    if verbatim:
        gcfg.prompts = verbatim  # plain strings: nothing to check beyond what parsing the rest checked
    return gcfg


def main(argv: list[str] | None = None) -> None:
    """Console entry point: parse ``key=value`` arguments, generate, print prompt + continuation per prompt."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__ + "\n" + GenerateConfig.__doc__)
        return
    try:
        gcfg = parse_args(args)
        texts = run_generate(gcfg)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"moe-generate: {error}") from None
    for i, (prompt, text) in enumerate(zip(gcfg.prompts, texts)):
        if len(texts) > 1:
            print(f"==== sample {i + 1}/{len(texts)} ====")
        print(prompt + text)
