"""The `jprune` command: `jprune inspect FILE [--json]`, `jprune convert SRC DST [--compact]`,
`jprune compact SRC DST`.

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

_COMPACT_HELP = (
    "store only the kept values of each pruned tensor (pruned entries' values are dropped: they "
    "load as zeros, the effective weights are the same), and tensors at least half zeros as their "
    "nonzeros; .safetensors, .msgpack or orbax"
)


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
    if "file_bytes" in summary:
        lines.append(
            f"size: {_bytes(summary['file_bytes'])} on disk, {_bytes(summary['dense_bytes'])} dense "
            f"(the tensors without masks): {100 * summary['ratio']:.1f}% of dense"
        )
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


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
      >>> main(["inspect", path])  # doctest: +ELLIPSIS
      name       shape   dtype    pruned  sparsity
      fc.weight  (2, 2)  float32  2/4     50.00%
      global sparsity: 50.00% (2 of 4 entries in 1 pruned tensor; 4 parameters in all)
      size: ... on disk, 16 B dense (the tensors without masks): ...% of dense
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
    p_convert.add_argument("--compact", action="store_true", help=_COMPACT_HELP)
    p_compact = sub.add_parser(
        "compact", help="write a compact checkpoint: only the kept values of pruned tensors, masks packed"
    )
    p_compact.add_argument("src")
    p_compact.add_argument("dst", help=".safetensors, .msgpack or an orbax directory")
    p_compact.add_argument(
        "--template", help="names/layouts for the other side, as for convert (when the kinds differ)"
    )
    p_compact.add_argument("--no-progress", action="store_true", help="never show a progress bar")
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
            compact = args.command == "compact" or args.compact
            _api.convert(args.src, args.dst, template=template, progress=progress, compact=compact)
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
