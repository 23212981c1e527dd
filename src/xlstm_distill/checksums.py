"""File checksums (sha256), and the check of an offline bundle where it arrived: join the files that were split into
parts, then compare every file's size and sha256 with the bundle's manifest.json. Standard library only: the bundle
carries this file as its verify.py, which runs before anything is installed (python3 verify.py [BUNDLE_FOLDER])."""

import hashlib
import json
import sys
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(root: Path) -> int:
    manifest = json.loads((root / "manifest.json").read_text())
    bad = []
    for name, info in manifest["files"].items():
        path = root / name
        parts = [path.with_name(p) for p in info.get("parts", [])]
        if parts and all(p.exists() for p in parts):
            with path.open("wb") as out:
                for part in parts:
                    out.write(part.read_bytes())
            for part in parts:
                part.unlink()
        if not path.exists():
            bad.append(f"{name}: missing")
        elif path.stat().st_size != info["bytes"] or sha256(path) != info["sha256"]:
            bad.append(f"{name}: damaged (size or checksum differs; copy it again)")
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{len(manifest['files']) - len(bad)} of {len(manifest['files'])} files complete")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent))
