"""`fleet keys`: make client keys for the gateway's keys file, and list what the file holds."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from gateway.keys import KeyEntry, KeysFileError, append_key, hash_key, load_keys_file, new_key
from gateway.settings import GatewaySettings

_DEFAULT_FILE = Path("~/.config/fleet/keys.yaml")


def _default_file() -> Path:
    try:
        configured = GatewaySettings().keys_file
    except ValidationError:
        configured = None
    return (configured or _DEFAULT_FILE).expanduser()


def _create(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    try:
        entry = KeyEntry(name=args.name, models=models, rpm=args.rpm, tpm=args.tpm,
                         concurrency=args.concurrency, admin=args.admin)
    except ValidationError as exc:
        problems = "; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        print(f"fleet keys create: {problems}", file=sys.stderr)
        return 2
    key = new_key()
    try:
        append_key(args.file, hash_key(key), entry)
    except (KeysFileError, OSError) as exc:
        print(f"fleet keys create: {exc}", file=sys.stderr)
        return 1
    limits = ", ".join(f"{v} {k}" for k, v in (("rpm", entry.rpm), ("tpm", entry.tpm),
                                                ("concurrency", entry.concurrency)) if v)
    print(f"Key '{entry.name}' for models {', '.join(models or ['*'])}"
          f"{'; ' + limits if limits else ''}; its hash is in {args.file}.\n"
          "The key is shown this once only:", file=sys.stderr)
    print(key)
    return 0


def _list(args: argparse.Namespace) -> int:
    try:
        entries = load_keys_file(args.file)
    except KeysFileError as exc:
        print(f"fleet keys list: {exc}", file=sys.stderr)
        return 1
    for digest, entry in entries.items():
        print(f"{digest[:19]}...  {entry.name:<24} models={','.join(entry.models or ['*'])} "
              f"rpm={entry.rpm or '-'} tpm={entry.tpm or '-'} "
              f"concurrency={entry.concurrency or '-'}{' admin' if entry.admin else ''}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleet keys", description="Client keys for the gateway's --keys-file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    default = _default_file()
    create = commands.add_parser("create", help="make a key, print it once, store its hash")
    create.add_argument("--name", required=True, help="Who the key is for (shown in logs).")
    create.add_argument("--models", help="Comma-separated models it may use (default: all).")
    create.add_argument("--rpm", type=int, help="Requests per minute (default: no limit).")
    create.add_argument("--tpm", type=int, help="Tokens per minute (default: no limit).")
    create.add_argument("--concurrency", type=int,
                        help="Requests in flight at once, streams or not (default: no limit).")
    create.add_argument("--admin", action="store_true",
                        help="The key may declare and remove the fleet's LoRA adapters.")
    create.add_argument("--file", type=Path, default=default,
                        help=f"The keys file, .yaml or .json (default {default}).")
    create.set_defaults(run=_create)
    listing = commands.add_parser("list", help="show the names, models and limits in the file")
    listing.add_argument("--file", type=Path, default=default, help=f"default {default}")
    listing.set_defaults(run=_list)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
