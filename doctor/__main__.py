"""`python -m doctor [check] [--repo DIR]`: the evaluator's rules, checked before it does.
`python -m doctor hotkey [SS58]`: show hotkey.txt, or validate and write a hotkey exactly."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from doctor import driver, ss58
from doctor.checks import CHECKS, FAIL, SKIP, WARN, Options, Result, check_hotkey, run_checks
from doctor.tower_data import check_tower_data

MARKS = {"PASS": "ok", FAIL: "XX", WARN: "!!", SKIP: "--"}


def table(results: list[Result]) -> str:
    width = max(len(r.check) for r in results)
    lines = [f"{'check':<{width}}  status  reason", f"{'-' * width}  ------  ------"]
    lines += [f"{r.check:<{width}}  {r.status:<6}  {r.reason}" for r in results]
    counts = {status: sum(r.status == status for r in results) for status in ("PASS", FAIL, WARN, SKIP)}
    lines.append("")
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) +
                 (": the evaluator would reject this repository" if counts[FAIL] else ""))
    return "\n".join(lines)


def command_check(args: argparse.Namespace) -> int:
    options = Options(repo=args.repo.resolve(), checkpoint=args.checkpoint, hotkey=args.hotkey,
                      export=not args.skip_export, data=args.data)
    results = run_checks(options, (*CHECKS, check_tower_data))
    print(table(results))
    if args.driver:  # apart from the table above: the evaluator does not judge this, the GPU does
        gpu = driver.check_driver(options.repo, args.driver)
        print("\n" + driver.report(gpu, args.driver))
        results += gpu
    failed = any(r.status == FAIL or (args.strict and r.status in (SKIP, WARN)) for r in results)
    return 1 if failed else 0


def command_hotkey(args: argparse.Namespace) -> int:
    path = args.repo / "hotkey.txt"
    if args.address is None:
        if not path.is_file():
            print(f"{path}: missing", file=sys.stderr)
            return 1
        print(f"{path}: {path.read_bytes()!r}")
        result = check_hotkey(Options(repo=args.repo))[0]
        print(f"{result.status}: {result.reason}")
        return 1 if result.status == FAIL else 0
    address = args.address.strip()  # a pasted address often carries a newline; the file must not
    try:
        ss58.validate_hotkey(address)
    except ss58.SS58Error as exc:
        print(f"not written: {address!r} is not a valid Bittensor hotkey: {exc}", file=sys.stderr)
        return 2
    path.write_bytes(address.encode("ascii"))  # exactly the address: no newline
    print(f"wrote {path} ({len(address)} bytes, no trailing newline): {address}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository to check (default: here)")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("check", allow_abbrev=False, help="run every check and print the table (the default)")
    for target in (parser, check):
        target.add_argument("--checkpoint", default="models/default",
                            help="checkpoint the container serves, relative to the repository")
        target.add_argument("--hotkey", default=None, help="your hotkey: hotkey.txt must hold exactly this")
        target.add_argument("--skip-export", action="store_true", help="do not export the checkpoint (faster)")
        target.add_argument("--strict", action="store_true", help="count warnings and skipped checks as failures")
        target.add_argument("--data", type=Path, metavar="PARQUET",
                            help="the evaluator's parquet: does the checkpoint's imported ImageBind tower reproduce "
                                 "its description_embed? (a tower-data row)")
        target.add_argument("--driver", help="an NVIDIA driver version (e.g. 550.54): would the image's builds "
                                             "use the GPU with it?")
    hotkey = commands.add_parser("hotkey", allow_abbrev=False,
                                 help="show hotkey.txt, or validate ADDRESS and write it exactly")
    hotkey.add_argument("address", nargs="?", help="an SS58 hotkey (48 characters, starting with 5)")
    args = parser.parse_args(argv)
    if args.command == "hotkey":
        return command_hotkey(args)
    return command_check(args)


if __name__ == "__main__":
    sys.exit(main())
