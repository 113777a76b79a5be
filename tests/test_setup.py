"""setup.sh leaves the user's torch alone: a torch outside the supported range stops it before any
change, and M2PT_ANY_TORCH=1 lets it go on with that torch (setup.py then states no torch range).

Each test makes a fresh virtual environment holding a stand-in torch: an installed distribution's
metadata and an empty package, which is all setup.sh reads before it installs anything."""
import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _environment(tmp_path: Path, torch_version: str) -> Path:
    """A fresh venv (with pip) whose only torch is a stand-in of `torch_version`; returns its python."""
    venv.create(tmp_path / "env", with_pip=True)
    python = tmp_path / "env" / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(f"__version__ = {torch_version!r}\n")
    info = site / f"torch-{torch_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {torch_version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")
    return python


def _installed(python: Path) -> list[str]:
    out = subprocess.check_output([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                                  text=True)
    return sorted(out.split())


def _setup(python: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    # No index and no wheel folder: anything setup.sh tried to install would fail at once, offline.
    environment = dict(os.environ, PYTHON=str(python), PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
                       PIP_FIND_LINKS=str(tmp_path / "no-wheels"), **env)
    for inherited in ("PIP_CONSTRAINT", "M2PT_TORCH_VERSION", "M2PT_TRITON_VERSION"):  # .ci/test-env sets them
        environment.pop(inherited, None)
    return subprocess.run(["bash", str(ROOT / "setup.sh")], capture_output=True, text=True, env=environment,
                          timeout=300)


@pytest.mark.slow
def test_unsupported_torch_stops_setup_with_nothing_changed(tmp_path):
    python = _environment(tmp_path, "2.10.0")
    before = _installed(python)
    result = _setup(python, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stderr
    assert "the installed torch is 2.10.0" in message and "torch>=2.11" in message, message
    assert "M2PT_ANY_TORCH=1 bash setup.sh" in message and "Nothing was installed" in message, message
    assert _installed(python) == before
    assert (Path(subprocess.check_output([python, "-c", "import torch; print(torch.__file__)"], text=True).strip())
            .read_text() == "__version__ = '2.10.0'\n")


@pytest.mark.slow
def test_any_torch_goes_on_with_the_installed_one(tmp_path):
    python = _environment(tmp_path, "2.10.0")
    result = _setup(python, tmp_path, M2PT_ANY_TORCH="1")
    # It gets past the torch check and asks pip for triton, which this offline setting cannot give.
    assert "[setup] stopped" not in result.stderr, result.stderr
    assert "[setup] installing triton==3.7.1" in result.stdout, result.stdout + result.stderr
    assert "no torch installed" not in result.stdout
    assert result.returncode != 0
    assert "torch==2.10.0" in _installed(python)

