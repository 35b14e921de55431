"""The `jprune` command: `jprune inspect FILE [--json]`, `jprune convert SRC DST`.

Every failure is one line on stderr, `jprune: error: ...`, naming the file: exit 1 for a refusal
(malformed input, a destination that is not a checkpoint, a failed write), 3 for an unexpected
error (a bug in jprune; its type is in the line, and JPRUNE_TRACEBACK=1 shows the traceback),
2 for a usage error (argparse), 130 on Ctrl-C.
"""

import argparse
import json
import os
import pickle
import sys
import warnings

from . import _api, _files, _inspect


def _table(summary: dict) -> str:
    head = ("name", "shape", "dtype", "pruned", "sparsity")
    rows = [
        (
            r["name"],
            str(tuple(r["shape"])),
            r["dtype"],
            f"{r['pruned']}/{r['numel']}",
            f"{100 * r['sparsity']:.2f}%",
        )
        for r in summary["tensors"]
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
    lines = [
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in [head, *rows]
    ]
    n = len(summary["tensors"])
    lines.append(
        f"global sparsity: {100 * summary['sparsity']:.2f}% "
        f"({summary['pruned']} of {summary['numel_pruned_tensors']} entries in {n} pruned "
        f"tensor{'s' if n != 1 else ''}; {summary['numel_params']} parameters in all)"
    )
    return "\n".join(lines)


def _template(path):
    obj = _files.load(path)
    if isinstance(obj, dict) and "params" in obj:  # a Flax checkpoint: its variables
        return {k: obj[k] for k in ("params", "batch_stats") if obj.get(k)}
    return obj


def main(argv: list[str] | None = None) -> int:
    """Runs the `jprune` command line; returns the exit status (0 ok, 1 refused, 2 usage, 3 bug).

    Args:
      argv: the arguments after the program name; None reads `sys.argv`.

    Returns:
      The exit status.

    Examples:
      >>> import os, tempfile, torch
      >>> from jprune.interop import save
      >>> from jprune.interop._cli import main
      >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
      >>> save({"fc.weight_orig": torch.ones(2, 2), "fc.weight_mask": torch.eye(2)}, path)
      >>> main(["inspect", path])
      name       shape   dtype    pruned  sparsity
      fc.weight  (2, 2)  float32  2/4     50.00%
      global sparsity: 50.00% (2 of 4 entries in 1 pruned tensor; 4 parameters in all)
      0
    """
    parser = argparse.ArgumentParser(
        prog="jprune", description="Pruned checkpoints between PyTorch and Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="list the pruned tensors of a checkpoint")
    p_inspect.add_argument("file", help=".pt, .pth, .safetensors, .msgpack or an orbax directory")
    p_inspect.add_argument("--json", action="store_true", help="print JSON for scripts")
    p_convert = sub.add_parser("convert", help="convert a checkpoint; direction by extension")
    p_convert.add_argument("src")
    p_convert.add_argument("dst")
    p_convert.add_argument(
        "--template",
        help="names/layouts for the other side: a Flax file (torch -> Flax) or a torch file (Flax -> torch)",
    )
    p_convert.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    args = parser.parse_args(argv)
    # Libraries' warnings (torch, numpy, orbax) would add lines to the one-line error; they are
    # shown, one line each, only when the command succeeded.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        status = _run(args)
    if status == 0:
        for message in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
            print(f"jprune: warning: {message}", file=sys.stderr)
    return status


def _run(args) -> int:
    try:
        if args.command == "inspect":
            summary = _inspect.summarize(args.file)
            print(json.dumps(summary, indent=2) if args.json else _table(summary))
        else:
            template = _template(args.template) if args.template else None
            progress = False if args.no_progress else None
            _api.convert(args.src, args.dst, template=template, progress=progress)
            print(f"wrote {args.dst}")
    except (ValueError, TypeError, OSError, pickle.UnpicklingError, MemoryError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        if args.command == "inspect" and not message.startswith(args.file):
            message = f"{args.file}: {message}"  # a summary's error names the tensor, not the file
        _error(message)
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:
        if os.environ.get("JPRUNE_TRACEBACK"):
            raise
        message = " ".join(str(e).split())
        _error(
            f"unexpected {type(e).__name__}: {message} (a bug in jprune: please report it; "
            "JPRUNE_TRACEBACK=1 shows the traceback)"
        )
        return 3
    return 0


def _error(message: str) -> None:
    print(f"jprune: error: {message}", file=sys.stderr)
