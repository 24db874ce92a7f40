"""``python -m reaemb.data describe <dataset> [--data-dir DIR]``: JSON statistics of a
dataset before and after preprocessing."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DataError
from .prepared import describe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reaemb.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="print dataset statistics as JSON")
    d.add_argument("dataset", help="ml-100k, amazon-office, yelp, amazon2023:<Cat>, yelp-raw, json:<Name>")
    d.add_argument("--data-dir", default=None, help="data folder (default $REAEMB_DATA_DIR)")
    d.add_argument("--min-rating", type=float, default=None)
    d.add_argument("--user-core", type=int, default=5)
    d.add_argument("--item-core", type=int, default=3)
    d.add_argument("--missing-text", choices=["error", "drop"], default="error")
    args = parser.parse_args(argv)
    try:
        stats = describe(
            args.dataset,
            args.data_dir,
            min_rating=args.min_rating,
            user_core=args.user_core,
            item_core=args.item_core,
            missing_text=args.missing_text,
        )
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
