"""``python -m deita_ray.export OUT_DIR --to sharegpt|messages|alpaca``: export a job's selection.

The same code as the pipeline's optional ``export`` stage (:mod:`deita_ray.stages.export`), for
a job that has already run: it reads ``OUT_DIR``'s selection and writes ``<format>.jsonl`` and
LLaMA-Factory's ``dataset_info.json`` under ``--dest`` (default ``OUT_DIR/export``). See
docs/report.md, "Exports".
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from deita_ray.data.exports import EXPORT_FORMATS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deita_ray.export",
        description="Write a job's selection as ShareGPT / OpenAI-messages / Alpaca JSONL, with "
        "LLaMA-Factory dataset_info.json entries.",
    )
    parser.add_argument("out_dir", help="the job's output directory (output.dir)")
    parser.add_argument(
        "--to",
        dest="formats",
        action="append",
        choices=EXPORT_FORMATS,
        required=True,
        help="a format to write (repeat for several)",
    )
    parser.add_argument("--dest", help="where to write (default: OUT_DIR/export)")
    parser.add_argument(
        "--name", default="deita_selection", help="dataset name in dataset_info.json"
    )
    args = parser.parse_args(argv)
    if not os.path.isdir(args.out_dir):
        print(f"error: {args.out_dir} is not a directory", file=sys.stderr)
        return 2
    from deita_ray.stages.export import export_selection

    try:
        summary = export_selection(
            args.out_dir, list(dict.fromkeys(args.formats)), args.dest, args.name
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
