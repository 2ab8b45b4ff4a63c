"""
C{lmgate keys}: manage the allow-list file.

  lmgate keys hash                      read a key on stdin, print its sha256: form
  lmgate keys add --id ID --owner OWNER [--plain] [--key KEY] [--file PATH]
  lmgate keys list [--file PATH]
  lmgate keys remove --id ID [--file PATH]
  lmgate keys check [FILE | --file PATH]

Every change is written atomically (a temporary file in the same directory,
fsynced, then renamed over the old one), so a running daemon reads either the
old file or the new one, never half of one; the new file is checked whole
before it replaces the old.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import secrets
import sys
import tempfile
from datetime import datetime, timezone
from typing import TextIO

from lmgate.access.allowlist import HASH_PREFIX, REQUIRED, _keyDigest, parseAllowList
from lmgate.access.credentials import maskKey
from lmgate.errors import ConfigError

DEFAULT_FILE = "etc/allowlist.csv"


def hashKey(key: str) -> str:
    """The C{sha256:<hex>} form of a key."""
    return HASH_PREFIX + hashlib.sha256(key.encode("ascii")).hexdigest()


def _readKey(stdin: TextIO) -> str:
    key = stdin.readline().rstrip("\r\n")
    if not key:
        raise SystemExit("lmgate keys: no key on standard input")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in key):
        raise SystemExit("lmgate keys: a key is visible ASCII without spaces")
    return key


def _rows(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of an existing file (a missing file: the standard header, no rows)."""
    if not os.path.exists(path):
        return list(REQUIRED), []
    with open(path, "rb") as f:
        content = f.read()
    parseAllowList(path, content)  # refuse to edit a file that is already broken
    reader = csv.reader(io.StringIO(content.decode("utf-8-sig"), newline=""), skipinitialspace=True)
    rows = [[cell.strip() for cell in row] for row in reader if any(cell.strip() for cell in row)]
    return rows[0], rows[1:]


def writeAtomically(path: str, header: list[str], rows: list[list[str]]) -> None:
    """Check the new content whole, then replace C{path} with it in one rename."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    content = out.getvalue().encode("utf-8")
    parseAllowList(path, content)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o640
    fd, temporary = tempfile.mkstemp(prefix=".allowlist-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _add(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    generated = False
    if args.key is not None:
        key = args.key
    elif stdin.isatty():
        key, generated = "lmg-" + secrets.token_urlsafe(24), True
    else:
        key = _readKey(stdin)
    header, rows = _rows(args.file)
    column = {name: header.index(name) for name in REQUIRED}
    digest = _keyDigest(key)
    if digest is None:
        raise SystemExit("lmgate keys: a key is visible ASCII without spaces")
    for row in rows:
        if row[column["id"]] == args.id:
            raise SystemExit(f"lmgate keys: {args.file}: id {args.id!r} is already on the list")
        if _keyDigest(row[column["api_key"]]) == digest:
            raise SystemExit(f"lmgate keys: {args.file}: that key is already on the list (id {row[column['id']]!r})")
    row = [""] * len(header)
    row[column["id"]], row[column["owner"]] = args.id, args.owner
    row[column["api_key"]] = key if args.plain else hashKey(key)
    row[column["added"]] = args.added or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    writeAtomically(args.file, header, rows + [row])
    if generated:
        stdout.write(f"{key}\n")
        sys.stderr.write(f"Added {args.id!r}; the new key is shown once above and stored only as its hash.\n")
    else:
        stdout.write(f"Added {args.id!r} ({maskKey(key.encode())}) to {args.file}\n")
    return 0


def _remove(args: argparse.Namespace, stdout: TextIO) -> int:
    header, rows = _rows(args.file)
    column = header.index("id")
    kept = [row for row in rows if row[column] != args.id]
    if len(kept) == len(rows):
        raise SystemExit(f"lmgate keys: {args.file}: no id {args.id!r}")
    writeAtomically(args.file, header, kept)
    stdout.write(f"Removed {args.id!r} from {args.file}\n")
    return 0


def _list(args: argparse.Namespace, stdout: TextIO) -> int:
    header, rows = _rows(args.file)
    column = {name: header.index(name) for name in REQUIRED}
    table = [("ID", "OWNER", "ADDED", "KEY")]
    for row in rows:
        key = row[column["api_key"]]
        shown = key[: len(HASH_PREFIX) + 8] + "…" if key.lower().startswith(HASH_PREFIX) else maskKey(key.encode())
        table.append((row[column["id"]], row[column["owner"]], row[column["added"]], shown))
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        stdout.write("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() + "\n")
    return 0


def _check(args: argparse.Namespace, stdout: TextIO) -> int:
    try:
        with open(args.file, "rb") as f:
            content = f.read()
    except OSError as e:
        sys.stderr.write(f"{args.file}: cannot read: {e.strerror or e}\n")
        return 1
    problems: list[str] = []
    entries = parseAllowList(args.file, content, problems)
    for problem in problems:
        sys.stderr.write(f"{args.file}: {problem}\n")
    if problems:
        return 1
    stdout.write(f"{args.file}: {len(entries)} keys, no problems\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgate keys", description="Manage LMGate's allow-list.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("hash", help="read a key on stdin and print its sha256: form")
    add = commands.add_parser("add", help="add a key (stored hashed unless --plain)")
    add.add_argument("--id", required=True, help="a unique name for the key (the record's lmgate_id)")
    add.add_argument("--owner", required=True, help="who the key belongs to (the record's owner)")
    add.add_argument("--key", help="the key (default: read from stdin; on a terminal, a new key is generated)")
    add.add_argument("--plain", action="store_true", help="store the key itself instead of its hash")
    add.add_argument("--added", help="the added date (default: today, UTC)")
    add.add_argument("--file", default=DEFAULT_FILE, help=f"the allow-list (default {DEFAULT_FILE})")
    remove = commands.add_parser("remove", help="remove a key by id")
    remove.add_argument("--id", required=True)
    remove.add_argument("--file", default=DEFAULT_FILE)
    listing = commands.add_parser("list", help="list ids, owners, dates and masked keys")
    listing.add_argument("--file", default=DEFAULT_FILE)
    check = commands.add_parser("check", help="validate a file, naming every bad line")
    # the file as a positional (as it always was) or as --file like the other subcommands
    check.add_argument("path", nargs="?", metavar="FILE", help=f"the allow-list (default {DEFAULT_FILE})")
    check.add_argument("--file", dest="fileOption", metavar="PATH", help="the same, as for the other subcommands")
    return parser


def main(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Run C{lmgate keys ...}; returns the exit code."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        if args.path is not None and args.fileOption is not None and args.path != args.fileOption:
            parser.error(f"keys check: two files given ({args.path} and --file {args.fileOption}); give one")
        args.file = args.path or args.fileOption or DEFAULT_FILE
    try:
        if args.command == "hash":
            stdout.write(hashKey(_readKey(stdin)) + "\n")
            return 0
        if args.command == "add":
            return _add(args, stdin, stdout)
        if args.command == "remove":
            return _remove(args, stdout)
        if args.command == "list":
            return _list(args, stdout)
        return _check(args, stdout)
    except ConfigError as e:
        sys.stderr.write(f"lmgate keys: {e}\n")
        return 1
