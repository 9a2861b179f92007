"""setup.cfg's ranges stay inside what the pinned TRL declares, and another TRL is refused at import.

Offline: TRL's own requirements are read from its installed package metadata.
"""

import configparser
import itertools
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from aapo_trl._trl_version import SUPPORTED_TRL_VERSION, unsupported_trl_message

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def _requirement_lines(value: str) -> list[Requirement]:
    return [Requirement(line) for line in (line.strip() for line in value.splitlines()) if line and line[0] != "#"]


def project_requirements() -> dict[str, list[Requirement]]:
    """{"": install_requires, extra: its requirements} from setup.cfg."""
    config = configparser.ConfigParser()
    config.read(SETUP_CFG, encoding="utf-8")
    found = {"": _requirement_lines(config["options"]["install_requires"])}
    for extra, value in config["options.extras_require"].items():
        found[extra] = _requirement_lines(value)
    return found


def trl_requirements() -> dict[str, SpecifierSet]:
    """Every distribution TRL names (core or in any extra), with the intersection of the ranges it gives it."""
    ranges: dict[str, SpecifierSet] = {}
    for line in metadata.requires("trl") or []:
        requirement = Requirement(line)
        name = requirement.name.lower().replace("_", "-")
        ranges[name] = ranges.get(name, SpecifierSet()) & requirement.specifier
    return ranges


def probe_versions(*specifiers: SpecifierSet) -> list[Version]:
    """Versions around every bound the specifiers name, plus far-off ones: where two ranges can differ."""
    probes = {Version("0.0.1"), Version("0.1.2"), Version("1.0"), Version("99.0")}
    for specifier in itertools.chain.from_iterable(specifiers):
        bound = Version(specifier.version.replace(".*", ""))
        major, minor, micro = (list(bound.release) + [0, 0])[:3]
        for dmajor, dminor, dmicro in itertools.product((-1, 0, 1), repeat=3):
            if min(major + dmajor, minor + dminor, micro + dmicro) >= 0:
                probes.add(Version(f"{major + dmajor}.{minor + dminor}.{micro + dmicro}"))
        probes.add(bound)
    return sorted(probes)


def versions_outside_trl(ours: SpecifierSet, trls: SpecifierSet) -> list[str]:
    return [str(v) for v in probe_versions(ours, trls) if ours.contains(v) and not trls.contains(v)]


def test_the_probe_catches_a_bare_requirement_and_a_wider_range():
    assert "0.1.2" in versions_outside_trl(SpecifierSet(""), SpecifierSet(">=0.22.0,<=0.31.0"))
    assert versions_outside_trl(SpecifierSet(">=1.4"), SpecifierSet(">=1.10.1"))
    assert "0.31.1" in versions_outside_trl(SpecifierSet(">=0.22,<0.32"), SpecifierSet(">=0.22.0,<=0.31.0"))
    assert not versions_outside_trl(SpecifierSet("==0.31.0"), SpecifierSet(">=0.22.0,<=0.31.0"))


def test_every_range_of_ours_is_inside_trls():
    trl = trl_requirements()
    outside = {}
    for extra, requirements in project_requirements().items():
        for requirement in requirements:
            name = requirement.name.lower().replace("_", "-")
            if name in trl:
                wrong = versions_outside_trl(requirement.specifier, trl[name])
                if wrong:
                    outside[f"[{extra}] {requirement}"] = f"TRL allows {trl[name]}; ours also allows {wrong}"
    assert not outside, outside


def test_vllm_extra_is_bounded_on_both_sides():
    (vllm,) = [r for r in project_requirements()["vllm"] if r.name == "vllm"]
    assert any(s.operator in (">=", "==", "~=") for s in vllm.specifier)
    assert any(s.operator in ("<", "<=", "==", "~=") for s in vllm.specifier)


def test_setup_cfg_pins_the_trl_release_the_import_guard_accepts():
    (trl,) = [r for r in project_requirements()[""] if r.name == "trl"]
    assert str(trl.specifier) == f"=={SUPPORTED_TRL_VERSION}"
    assert metadata.version("trl") == SUPPORTED_TRL_VERSION


def test_the_guard_names_installed_and_supported_versions():
    assert unsupported_trl_message(SUPPORTED_TRL_VERSION) is None
    message = unsupported_trl_message("1.17.0")
    assert "1.17.0" in message and f"trl=={SUPPORTED_TRL_VERSION}" in message
    assert "not installed" in unsupported_trl_message(None)


@pytest.mark.parametrize("installed", ["1.15.2", "1.17.0"])
def test_import_stops_at_once_under_another_trl(installed):
    # metadata.version reports another TRL release; aapo_trl must refuse before importing TRL at all
    code = (
        "import sys, importlib.metadata as m\n"
        "real = m.version\n"
        f"m.version = lambda name: {installed!r} if name == 'trl' else real(name)\n"
        "try:\n"
        "    import aapo_trl\n"
        "except ImportError as error:\n"
        "    print('REFUSED', error, 'trl' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("REFUSED"), result.stdout + result.stderr
    assert installed in result.stdout and f"trl=={SUPPORTED_TRL_VERSION}" in result.stdout
    assert result.stdout.strip().endswith("False")  # TRL itself was never imported
