"""``moe-export``: a ``moe-train`` run as a Hugging Face transformers model folder.

    moe-export source=outputs/<date>/<time> output=hf/my-moe            # architecture=auto|mixtral|qwen2_moe

The folder holds ``config.json``, ``model.safetensors`` (float32), ``generation_config.json`` and, when the run
has a ``tokenizer.json``, the tokenizer files; ``transformers.AutoModelForCausalLM.from_pretrained(folder)``
loads it without ``trust_remote_code``. Byte-level runs (data.source stdlib/text) get no tokenizer: their
token ids are UTF-8 bytes. See docs/export.md for what maps to what and what is refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from moe.cli_args import parse_key_values


@dataclass
class ExportConfig:
    """``moe-export`` settings: ``source`` (run directory or checkpoint file), ``output`` (a new or empty folder),
    ``architecture`` (auto: Mixtral when it can express the model, else Qwen2-MoE; or mixtral, qwen2_moe)."""

    source: str = "???"
    output: str = "???"
    architecture: str = "auto"


def export_run(ecfg: ExportConfig) -> dict:
    """Write ``ecfg.source``'s model into ``ecfg.output``; returns what was written."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from moe.interop import to_hf_model
    from moe.train.loading import BYTE_SOURCES, load_run, tokenizer_file

    output = Path(ecfg.output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"output={ecfg.output!r} exists and is not an empty folder; choose a new one")
    loaded = load_run(ecfg.source)
    hf = to_hf_model(loaded.model, ecfg.architecture)
    tokenizer = None
    if loaded.cfg.data.source not in BYTE_SOURCES:
        tokenizer = tokenizer_file(loaded.cfg, loaded.run_dir)
        if tokenizer is None:
            raise FileNotFoundError(
                f"the run's data.source={loaded.cfg.data.source!r} has no tokenizer.json in {loaded.run_dir} or next "
                f"to data.path={loaded.cfg.data.path!r}; nothing was written"
            )
    hf.generation_config = GenerationConfig(max_length=loaded.model.cfg.seq_len)
    hf.save_pretrained(output)
    if tokenizer is not None:
        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer)).save_pretrained(output)
    return {
        "source": str(loaded.path),
        "output": str(output),
        "architecture": type(hf).__name__,
        "tokenizer": str(tokenizer) if tokenizer else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Console entry point: parse ``key=value`` arguments and export."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__ + "\n" + ExportConfig.__doc__)
        return
    try:
        done = export_run(parse_key_values(ExportConfig, args))
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"moe-export: {error}") from None
    tokenizer = f"tokenizer from {done['tokenizer']}" if done["tokenizer"] else "no tokenizer (byte-level ids)"
    print(f"moe-export: {done['source']} -> {done['output']} as {done['architecture']}, {tokenizer}")
