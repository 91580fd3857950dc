"""The wheel works without the source tree: built from the project, installed (no editable install) into a fresh
venv, it runs `reaemb quickstart --help` and loads the quickstart's packaged settings."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*cmd, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_installs_and_runs_the_quickstart_entry(tmp_path):
    # a copy of what the wheel is built from, so no stale build/ folder of the working tree leaks into it
    source = tmp_path / "source"
    shutil.copytree(REPO / "reaemb_trl", source / "reaemb_trl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run(*pip, "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", cwd=source)
    (wheel,) = (tmp_path / "dist").glob("reaemb_trl-*.whl")

    # the fresh venv sees this venv's dependencies through a .pth line, which adds the folder to sys.path without
    # running that folder's own .pth files: the editable install's finder of reaemb_trl stays out
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "outer_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)

    help_text = run(venv / "bin" / "reaemb", "quickstart", "--help", cwd=tmp_path)
    assert "--settings" in help_text and "--output" in help_text
    loaded = run(python, "-c", "import reaemb_trl; from reaemb_trl.quickstart import QuickstartSettings; "
                 "s = QuickstartSettings.from_yaml(); print(reaemb_trl.__file__); print(s.backbone, s.eval_seeds)",
                 cwd=tmp_path)
    package_file, settings = loaded.splitlines()
    assert Path(package_file).is_relative_to(site), package_file  # the wheel's copy, not the working tree
    assert settings == "smollm2 3"
