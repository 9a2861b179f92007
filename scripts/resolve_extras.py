"""Resolve aapo-trl's extras as an installer would on a CUDA Linux machine, without installing anything.

    python scripts/resolve_extras.py [--uv PATH] [--python-version 3.11] [--glibc 2.35] [--extras "" vllm ...]

(`make resolve-extras`.) A wheel of this checkout is built, then ``uv pip compile`` resolves each extra against
PyPI alone (no local wheel folders, constraints or pip.conf of this machine: what a user's
``pip install aapo-trl[EXTRA]`` sees) for CPython on x86_64 Linux with the given glibc, where PyPI's torch wheels
are the CUDA builds. uv, not ``pip install --dry-run --platform``: pip can only resolve wheels for a foreign
platform (``--only-binary=:all:``), and DeepSpeed and some of lighteval's dependencies publish source
distributions only. One line per extra gives the versions of the packages that decide whether the stack works.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHOWN = ("torch", "vllm", "transformers", "trl", "deepspeed", "peft", "accelerate", "lighteval")
DEFAULT_EXTRAS = ("", "vllm", "deepspeed", "eval", "vllm,deepspeed,eval")
PINNED_LINE = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+)")


def pypi_only_environment() -> dict[str, str]:
    """This process's environment without this machine's installer settings (local wheels, constraints, configs)."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith(("PIP_", "UV_"))}
    environment["UV_NO_CONFIG"] = "1"
    return environment


def build_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(folder), str(REPO)],
                   check=True)
    (wheel,) = folder.glob("aapo_trl-*.whl")
    return wheel


def resolve(uv: str, wheel: Path, extra: str, python_version: str, glibc: str, scratch: Path) -> dict[str, str]:
    """The versions resolved for ``aapo-trl[extra]`` on that platform: {distribution: version}, or {"error": ...}."""
    name = extra.replace(",", "-") or "base"
    requirements = scratch / f"{name}.in"
    requirements.write_text((f"aapo-trl[{extra}]" if extra else "aapo-trl") + f" @ {wheel.as_uri()}\n")
    command = [uv, "pip", "compile", "--quiet", "--no-header", "--index-url", "https://pypi.org/simple",
               "--python-platform", f"x86_64-manylinux_{glibc.replace('.', '_')}", "--python-version", python_version,
               str(requirements), "-o", str(scratch / f"{name}.txt")]
    result = subprocess.run(command, env=pypi_only_environment(), capture_output=True, text=True)
    if result.returncode:
        return {"error": " ".join(result.stderr.split())[-800:]}
    pinned = (PINNED_LINE.match(line) for line in (scratch / f"{name}.txt").read_text().splitlines())
    return {match[1].lower(): match[2] for match in pinned if match}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[2])
    parser.add_argument("--uv", default=shutil.which("uv"), help="the uv executable (default: uv on PATH)")
    parser.add_argument("--python-version", default="3.11")
    parser.add_argument("--glibc", default="2.35", help="the machine's glibc (2.35: Ubuntu 22.04)")
    parser.add_argument("--extras", nargs="*", default=list(DEFAULT_EXTRAS),
                        help='extras to resolve, each one or several comma-separated ("" = no extra)')
    args = parser.parse_args(argv)
    if not args.uv:
        parser.error("uv is not on PATH: pip install uv, or pass --uv PATH (make resolve-extras installs it)")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        wheel = build_wheel(scratch)
        with concurrent.futures.ThreadPoolExecutor(len(args.extras)) as pool:
            results = list(pool.map(
                lambda extra: resolve(args.uv, wheel, extra, args.python_version, args.glibc, scratch), args.extras))
    uv_version = subprocess.run([args.uv, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"# {uv_version} pip compile, PyPI only, CPython {args.python_version}, x86_64 Linux glibc {args.glibc} "
          f"(PyPI's torch there is the CUDA build); {datetime.date.today().isoformat()}")
    print("| extra | " + " | ".join(SHOWN) + " |")
    print("|" + "---|" * (len(SHOWN) + 1))
    failed = False
    for extra, versions in zip(args.extras, results):
        label = f"aapo-trl[{extra}]" if extra else "aapo-trl"
        if "error" in versions:
            failed = True
            print(f"| {label} | unresolvable: {versions['error']} |")
        else:
            print(f"| {label} | " + " | ".join(versions.get(name, "-") for name in SHOWN) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
