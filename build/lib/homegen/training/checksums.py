"""Checksum manifests of checkpoint steps: the size and SHA-256 of every file of a finished step, written
next to its files, so that a damaged step (bytes flipped, a file truncated or deleted) is found before it
is restored instead of loading silently or failing deep inside TensorStore."""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "homegen_checksums.json"
_CHUNK = 1 << 22


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file under `step_dir` but the manifest, as sorted paths relative to it."""
    out = []
    for folder, _, names in os.walk(step_dir):
        out.extend(os.path.relpath(os.path.join(folder, n), step_dir) for n in names)
    return sorted(p for p in out if p != MANIFEST)


def has_manifest(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, MANIFEST))


def write_manifest(step_dir: str) -> None:
    """Records the size and SHA-256 of every file of a finished step (written atomically)."""
    files = {p: {"bytes": os.path.getsize(os.path.join(step_dir, p)), "sha256": _sha256(os.path.join(step_dir, p))}
             for p in _files(step_dir)}
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=0)
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def manifest_problems(step_dir: str) -> list[str] | None:
    """What differs from the step's manifest: missing, resized or changed files (empty when intact);
    None when the step has no manifest (written before manifests existed, or the job stopped between
    finishing the step and recording it)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"its checksum manifest {MANIFEST} is unreadable ({type(e).__name__})"]
    problems = []
    for rel, entry in expected.items():
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel} is missing")
        elif (size := os.path.getsize(full)) != entry["bytes"]:
            problems.append(f"{rel} has {size:,} bytes, {entry['bytes']:,} when saved (truncated or overwritten)")
        elif _sha256(full) != entry["sha256"]:
            problems.append(f"{rel} has changed since it was saved (SHA-256 mismatch)")
    return problems
