"""`qforge` command line: one sub-command per module, each imported only when it runs.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`; its docstring is the
command's help. Add a command by adding one row to COMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module implementing it, one-line summary for `qforge --help`)
COMMANDS = {
    "demo": ("qforge.commands.demo", "run the main job on the embedded SmolLM2-135M-Instruct model"),
    "train": ("qforge.commands.train", "fine-tune a model (QLoRA, BF16 LoRA or full) on a JSONL dataset"),
    "quantize": ("qforge.commands.quantize", "write a model folder in bitsandbytes' 4-bit format"),
    "merge": ("qforge.commands.merge", "merge an adapter into its base the right way: dequantise, merge, requantise"),
    "export": ("qforge.commands.export", "export a fine-tune as GGUF for llama.cpp / Ollama (merged, or the LoRA alone)"),
    "serve": ("qforge.commands.serve", "serve the base and many adapters behind an OpenAI-compatible API"),
    "worker": ("qforge.commands.worker", "run fine-tuning jobs from a shared job database (many workers, PostgreSQL)"),
    "bench": ("qforge.commands.bench", "compare QLoRA (NF4/FP4), BF16 LoRA, full, QDoRA and LoftQ on one task"),
    "eval": ("qforge.commands.eval", "evaluate the base and adapters with lm-evaluation-harness through one server"),
    "plan": ("qforge.commands.plan", "predict the memory of a QLoRA / LoRA / full fine-tuning run and recommend a method"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The command's docstring as written, and every option's default after its help (unless the
    help already says it, as "default:" or "(default ...")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or _says_default(text):
            return text
        default = action.default
        shown = "none" if default in (None, []) else ("off" if default is False else default)
        return f"{text} (default: {str(shown).replace('%', '%%')})".strip()


def _says_default(text: str) -> bool:
    lowered = text.lower()
    return "default:" in lowered or "(default " in lowered


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: a bad value names the flag, what was expected and where the
    flags are listed, instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from . import __version__

    parser = Parser(prog="qforge", description="QLoRA fine-tuning end to end on one machine.")
    parser.add_argument("--version", action="version", version=f"qforge {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, summary) in COMMANDS.items():
        if name != only:
            sub.add_parser(name, help=summary)
            continue
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    wanted = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only=wanted)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0
    try:
        return int(args._module.run(args) or 0)
    except (FileNotFoundError, ValueError) as exc:  # what the user can act on: one line, status 2
        if os.environ.get("QFORGE_DEBUG"):
            raise
        print(f"qforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
