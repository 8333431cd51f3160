"""`scripts/serve` installs only when the dependencies changed, then serves: a restart
starts at once. Run on a copy of the script beside a stand-in `scripts/install` and
`.venv/bin/batchery` that record their calls."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _checkout(tmp: Path) -> Path:
    (tmp / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "serve", tmp / "scripts" / "serve")
    shutil.copy(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    install = tmp / "scripts" / "install"
    # The stand-in install makes the venv's `batchery`, which records how it was called.
    install.write_text("#!/usr/bin/env bash\nset -e\ncd \"$(dirname \"$0\")/..\"\n"
                       "echo installed >> calls\nmkdir -p .venv/bin\n"
                       "printf '#!/usr/bin/env bash\\necho \"$*\" >> calls\\n' "
                       "> .venv/bin/batchery\nchmod +x .venv/bin/batchery\n")
    install.chmod(0o755)
    return tmp


def _serve(repo: Path, *args: str) -> list[str]:
    subprocess.run(["bash", str(repo / "scripts" / "serve"), *args], check=True, timeout=60,
                   cwd=repo / "scripts")
    return (repo / "calls").read_text().splitlines()


def test_serve_installs_once_then_only_when_the_dependencies_change(tmp_path: Path) -> None:
    repo = _checkout(tmp_path)
    assert _serve(repo, "--port", "9000") == ["installed", "serve --port 9000"]
    assert _serve(repo) == ["installed", "serve --port 9000", "serve"]
    with (repo / "pyproject.toml").open("a") as f:
        f.write("\n# a new dependency\n")
    assert _serve(repo)[-2:] == ["installed", "serve"]
    assert _serve(repo)[-2:] == ["serve", "serve"]
    (repo / ".venv" / "bin" / "batchery").unlink()  # a venv without Batchery installs again
    assert _serve(repo)[-2:] == ["installed", "serve"]
