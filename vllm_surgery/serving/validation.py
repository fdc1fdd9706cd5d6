"""Whether an adapter directory can be served by THIS server: one check, used by the resolver, hot-swap,
the adapter listing and the guarded runtime-load route, so that what the listing calls servable is
exactly what a swap accepts.

An adapter that `load_adapter` accepts (valid PEFT files, finite tensors, shapes that agree with its
own rank) can still break a running server:

- a rank above the server's ``--max-lora-rank`` makes the engine refuse the load;
- tensors that fit their own rank but not the base model (``lora_A`` with 96 input features for a
  128-wide layer) are served silently or fail inside the engine;
- finite weights too large for the serving dtype overflow inside the engine: vLLM 0.32 then answered
  400 for that adapter and for the next request to another adapter.

`AdapterValidator.validate` checks all of these (against `ServingLimits`: the base model's layer
shapes from its configuration, the max rank and the serving dtype) and caches the verdict per
(resolved path, inode, size, mtime) of the adapter's files, so listing many versions stays cheap.

What vLLM loads is never the checked directory itself but a snapshot of it (`Snapshots`,
`snapshot_adapter`): a private copy, validated as copied, that nobody writes again. An adapter file
overwritten in place while vLLM holds it memory-mapped kills the engine (SIGBUS); a file changed
between the check and the load would be served unchecked.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, load_adapter
from ..base_model import LayerShape, check_adapter_fits
from ..errors import AdapterError

# The overflow bound. vLLM computes a LoRA layer in the serving dtype as (x @ A^T) @ (s * B)^T, with
# the scaling s folded into B when the adapter is loaded. For one input row x:
#   |(A x)_i|      <= ||A x||_2      <= sigma_max(A) * ||x||_2           (the intermediate)
#   |(s B A x)_i|  <= ||s B A x||_2  <= sigma_max(s * B @ A) * ||x||_2   (the update added to W x)
# so nothing overflows while max(sigma_max(A), sigma_max(s B A)) * ||x||_2 stays below the dtype's
# largest finite value. ||x||_2 = sqrt(in_features) * rms(x). The inputs of adapted projections are
# RMSNorm outputs (q/k/v/gate/up: rms about the mean |gamma|, O(1)) or attention / SwiGLU outputs
# (o/down: rms O(1)-O(10) in trained models; single outlier channels reach 1e3 but the RMS of a row
# stays far below 1e2). With rms(x) <= 100 the bound is a worst case (input aligned with the top
# singular vector) that a trained adapter passes by orders of magnitude: in float16 (max 65504) a
# 4096-wide layer allows sigma_max up to ~10, where trained LoRA updates have sigma_max of ~0.01-1;
# in bfloat16/float32 (max ~3.4e38) only absurd weights (like 1e30 entries) are refused.
log = logging.getLogger(f"vllm.{__name__}")

ACTIVATION_RMS_BOUND = 100.0
CACHE_SIZE = 1024


@dataclass(frozen=True)
class ServingLimits:
    """What the running engine accepts. None means unknown (that check is not made; the engine's own
    check then applies, and start-up logs say which checks are off)."""

    max_rank: int | None = None
    dtype: torch.dtype | None = None
    shapes: Mapping[str, LayerShape] | None = None


def _largest_singular_value(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m, ord=2)) if m.numel() else 0.0


def check_overflow(adapter: LoraAdapter, dtype: torch.dtype) -> None:
    """Raise AdapterError naming the tensor or module whose values overflow `dtype` when served."""
    if not dtype.is_floating_point:
        return
    limit = float(torch.finfo(dtype).max)
    where = adapter.path / WEIGHTS_NAME
    for name, mod in adapter.modules.items():
        a = adapter.tensors[mod.a_key].double()
        b_scaled = adapter.tensors[mod.b_key].double() * mod.scaling
        for key, t, what in ((mod.a_key, a, ""), (mod.b_key, b_scaled, f" x scaling {mod.scaling:g}")):
            if not bool(torch.isfinite(t.to(dtype)).all()):
                raise AdapterError(
                    f"{where}: tensor {key!r}{what} has values beyond {dtype}'s largest finite value "
                    f"{limit:.4g} (largest |value| {float(t.abs().max()):.4g}); this server computes in {dtype}"
                )
        sigma_a = _largest_singular_value(a)
        # sigma_max(s B A) from the r x r core: B = Qb Rb, A^T = Qa Ra  =>  s B A = Qb (Rb Ra^T) Qa^T
        core = torch.linalg.qr(b_scaled).R @ torch.linalg.qr(a.T).R.T
        sigma_update = _largest_singular_value(core)
        worst = max(sigma_a, sigma_update) * math.sqrt(mod.in_features) * ACTIVATION_RMS_BOUND
        if not worst <= limit:
            raise AdapterError(
                f"{where}: module {name!r} overflows {dtype} when served: largest singular value "
                f"{sigma_update:.4g} of the update (scaling x lora_B @ lora_A) and {sigma_a:.4g} of lora_A "
                f"can reach {worst:.4g} for an input of RMS {ACTIVATION_RMS_BOUND:g}, above {dtype}'s "
                f"largest finite value {limit:.4g}"
            )


def check_limits(adapter: LoraAdapter, limits: ServingLimits) -> None:
    """Raise AdapterError if the loaded `adapter` exceeds the server's rank, shapes or dtype."""
    if limits.max_rank is not None:
        ranks = {name: mod.rank for name, mod in adapter.modules.items()}
        # vLLM compares max(r, *rank_pattern.values()) with --max-lora-rank (lora/peft_helper.py)
        ranks["r (adapter_config.json)"] = int(adapter.config["r"])
        for pattern, r in (adapter.config.get("rank_pattern") or {}).items():
            if isinstance(r, int):
                ranks[f"rank_pattern {pattern!r}"] = r
        where, rank = max(ranks.items(), key=lambda kv: kv[1])
        if rank > limits.max_rank:
            raise AdapterError(
                f"{adapter.path}: rank {rank} ({where}) exceeds this server's --max-lora-rank "
                f"{limits.max_rank}; restart the server with --max-lora-rank {rank} or more to serve it"
            )
    if limits.shapes is not None:
        check_adapter_fits(adapter, limits.shapes)
    if limits.dtype is not None:
        check_overflow(adapter, limits.dtype)


def _fingerprint(path: Path) -> tuple:
    out = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            st = (path / name).stat()
        except OSError:
            out.append((name, None))
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def check_contained(path: Path, inside: Path) -> Path:
    """`path` resolved, after checking that it and the files in it do not lead outside `inside`
    (a symlinked version directory or weights file pointing out of the store). Raises AdapterError."""
    base = inside.resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(base) or resolved == base:
        raise AdapterError(f"{path}: resolves to {resolved}, outside {base}")
    if resolved.is_dir():
        for entry in resolved.iterdir():
            target = entry.resolve()
            if not target.is_relative_to(resolved):
                raise AdapterError(f"{entry}: a link to {target}, outside the version directory {resolved}")
    return resolved


class AdapterValidator:
    """Validates adapter directories against `limits`, caching verdicts by the files' identity."""

    def __init__(self, limits: ServingLimits | None = None) -> None:
        self.limits = limits or ServingLimits()
        self._cache: OrderedDict[tuple, tuple[bool, str]] = OrderedDict()
        self._lock = threading.Lock()
        # Directories of private copies (snapshots): read in place, nobody else writes them.
        self.private: list[Path] = []

    def configure(self, limits: ServingLimits) -> None:
        """New limits (the engine's, known at init_state); forgets every cached verdict."""
        with self._lock:
            self.limits = limits
            self._cache.clear()

    def validate(self, path: Path, inside: Path | None = None) -> str:
        """The content hash of the servable adapter at `path` (blocking: reads the files once per change).

        `inside`: a directory the adapter and its files must not leave (the store). Raises AdapterError
        saying what is wrong (the same message every time for unchanged files).
        """
        resolved = check_contained(path, inside) if inside is not None else path.resolve()
        key = (str(resolved), _fingerprint(resolved))
        with self._lock:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
        if verdict is None:
            verdict = self._check(path)
            self._remember(key, verdict)
        ok, text = verdict
        if not ok:
            raise AdapterError(text)
        return text

    def _check(self, path: Path) -> tuple[bool, str]:
        """(ok, content hash or error). A directory that is not one of our private copies (`private`)
        is checked through a temporary private copy: safetensors memory-maps the file it reads, and
        a file truncated in place while this process reads the mapping is SIGBUS for the server."""
        if path.is_dir() and not any(path.resolve().is_relative_to(p) for p in self.private):
            with tempfile.TemporaryDirectory(prefix="vllm-surgery-check-") as tmp:
                copy = Path(tmp) / "adapter"
                copy.mkdir(mode=0o700)
                try:
                    _copy_files(path, copy, hashlib.sha256())
                except AdapterError as e:
                    return False, str(e)
                ok, text = self._check_here(copy)
                return ok, text if ok else text.replace(str(copy), str(path))
        return self._check_here(path)

    def _check_here(self, path: Path) -> tuple[bool, str]:
        try:
            adapter = load_adapter(path)
            check_limits(adapter, self.limits)
            return True, adapter.content_hash()
        except AdapterError as e:
            return False, str(e)

    def _remember(self, key: tuple, verdict: tuple[bool, str]) -> None:
        with self._lock:
            self._cache[key] = verdict
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)

    def validate_copy(self, copy: Path, source: Path) -> str:
        """Validate `copy`, a private copy of the adapter at `source`, uncached; errors name `source`'s
        files (the operator's), not the copy's. Returns the content hash; raises AdapterError."""
        ok, text = self._check_here(copy)
        if not ok:
            raise AdapterError(text.replace(str(copy), str(source)))
        return text

    def adopt(self, path: Path, content_hash: str) -> None:
        """Cache a positive verdict for `path`, a copy that `validate_copy` accepted and that was renamed
        into place since (same files, new name): the next `validate(path)` reads nothing."""
        resolved = path.resolve()
        self._remember((str(resolved), _fingerprint(resolved)), (True, content_hash))


# ----------------------------------------------------------------------------------------- snapshots
# vLLM memory-maps an adapter's weights when it loads them and keeps them in its CPU LoRA cache: an
# adapter file truncated in place (`cp new old`, same inode) while cached makes the engine worker touch
# a mapping past the end of the file (SIGBUS), the engine dies and every adapter with it. And a file
# changed between the check and vLLM's load would be served unchecked. So vLLM only ever gets a
# snapshot: a private copy of exactly the files it reads, copied first and validated as copied, in a
# directory only this user can read (0700, files 0600), renamed into place complete and never written
# again. Its address is the SHA-256 of the copied bytes, so the same content gets the same directory.
SNAPSHOT_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # what vLLM reads of a LoRA directory (after our checks)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Snapshot:
    """A validated private copy: `path` is what vLLM loads; `content_hash` the adapter's content hash
    (what ties refined versions to an original); `digest` the SHA-256 of the copied files."""

    path: Path
    content_hash: str
    digest: str


def _copy_file(source: Path, target: Path, digest: Any) -> None:
    """Copy with plain reads (never a memory map: the source may be truncated under us) into a new
    0600 file, feeding the bytes to `digest`."""
    try:
        fin = open(source, "rb")  # noqa: SIM115 (closed below)
    except FileNotFoundError as e:
        raise AdapterError(f"{source}: missing") from e
    except OSError as e:
        raise AdapterError(f"{source}: cannot be read ({e.strerror or e})") from e
    with fin:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fout:
            digest.update(f"{target.name}\0".encode())
            size = 0
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            digest.update(f"\0{size}\0".encode())


def _copy_files(source: Path, target: Path, digest: Any) -> None:
    """Copy the files vLLM reads from the adapter directory `source` into the directory `target`.
    Raises AdapterError naming the source's file (missing, pickles only: as `load_adapter` says it)."""
    if not (source / CONFIG_NAME).is_file() or not (source / WEIGHTS_NAME).is_file():
        load_adapter(source)  # raises the precise error without reading any weights
    for name in SNAPSHOT_FILES:
        _copy_file(source / name, target / name, digest)


def snapshot_adapter(source: Path, parent: Path, leaf: str, validator: AdapterValidator) -> Snapshot:
    """Copy the adapter at `source` into `parent/<sha256 of the files>/<leaf>` and validate the copy.

    The files are copied into a hidden temporary directory under `parent`, hashed as they are copied,
    validated there (the copy, not the source: nothing can change between check and use), then the
    directory is renamed into place. When that address exists already (the same content was snapshot
    before under the same leaf), the copy is dropped and the existing snapshot is returned. Directories
    are 0700 and files 0600. Blocking. Raises AdapterError naming `source`'s file and the problem (the
    copy is removed then).
    """
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = parent / f".tmp-{secrets.token_hex(6)}"
    tmp.mkdir(mode=0o700)
    try:
        digest = hashlib.sha256()
        _copy_files(source, tmp, digest)
        address = digest.hexdigest()
        final = parent / address / leaf
        if final.is_dir():
            shutil.rmtree(tmp)
            try:
                return Snapshot(final, validator.validate(final), address)
            except AdapterError as e:  # the limits changed since it was taken
                raise AdapterError(str(e).replace(str(final), str(source))) from e
        content_hash = validator.validate_copy(tmp, source)
        (parent / address).mkdir(mode=0o700, exist_ok=True)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(tmp)  # another thread took the same snapshot meanwhile: the same bytes
        validator.adopt(final, content_hash)
        return Snapshot(final, content_hash, address)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _identity(path: Path) -> tuple:
    """The identity of an adapter's files, ctime included (a write always changes it, even one that
    restores the mtime afterwards)."""
    out = []
    for name in SNAPSHOT_FILES:
        try:
            st = (path / name).stat()
        except OSError:
            return ()
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


class Snapshots:
    """The snapshots of one server process: `<root>/<server id>/<name>/<sha256>/<version>`.

    Per process, because only this process knows which of its snapshots vLLM may still read: the
    directory is created on first use with a lock file (`<root>/<server id>.lock`) held for the life
    of the process; a directory whose lock is free belongs to a server that is gone and is removed
    then. Within it, a snapshot that an adapter name serves (`in_use`) is never deleted; others are
    deleted `grace_s` seconds after they were last taken or seen in use (`cleanup`, run after each new
    snapshot). The leaf is the version ("original" or a store version id), so a snapshot path says
    which version of which adapter it holds (`locate`).
    """

    def __init__(self, root: Path, validator: AdapterValidator, grace_s: float) -> None:
        self.root = Path(root)
        self.validator = validator
        self.grace_s = float(grace_s)
        # Which paths adapter names serve now (the hot-swapper sets it: vLLM's name -> request mapping).
        self.in_use: Callable[[], set[str]] | None = None
        self._dir: Path | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.Lock()
        # Taking and cleaning one at a time: a cleanup must not remove the address directory a
        # snapshot is being renamed into, nor a snapshot that is being handed out again.
        self._busy = threading.RLock()
        self._by_source: dict[tuple, Snapshot] = {}
        self._last_used: dict[Path, float] = {}

    @property
    def directory(self) -> Path:
        """This process's snapshot directory, created (and dead servers' removed) on first use."""
        with self._mutex:
            if self._dir is None:
                self._dir = self._create()
            return self._dir

    def _create(self) -> Path:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        server_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(self.root / f"{server_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_fd = fd  # held until the process exits
        path = self.root / server_id
        path.mkdir(mode=0o700)
        self.validator.private.append(path.resolve())
        self._remove_dead_servers(server_id)
        atexit.register(shutil.rmtree, path, True)
        return path

    def _remove_dead_servers(self, own: str) -> None:
        for lock in sorted(self.root.glob("*.lock")):
            server_id = lock.name[: -len(".lock")]
            if server_id == own:
                continue
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live server
            else:
                shutil.rmtree(self.root / server_id, ignore_errors=True)
                lock.unlink(missing_ok=True)
                log.info("snapshots: removed %s, left by a server that is gone", self.root / server_id)
            finally:
                os.close(fd)

    def take(self, name: str, version: str, source: Path, inside: Path | None = None) -> Snapshot:
        """The snapshot of `version` of adapter `name` whose files are at `source` (blocking).

        `inside`: a directory the source and its files must not leave (the store). An unchanged source
        (same files: device, inode, size, mtime and ctime) answers its last snapshot without copying.
        Raises AdapterError naming the source's file and the problem.
        """
        with self._busy:
            return self._take(name, version, source, inside)

    def _take(self, name: str, version: str, source: Path, inside: Path | None) -> Snapshot:
        resolved = check_contained(source, inside) if inside is not None else source.resolve()
        key = (str(resolved), name, version, _identity(resolved))
        snap = self._by_source.get(key) if key[-1] else None
        if snap is not None and snap.path.is_dir():
            try:
                self.validator.validate(snap.path)  # cached; refused only if the limits changed since
            except AdapterError as e:
                raise AdapterError(str(e).replace(str(snap.path), str(source))) from e
        else:
            snap = snapshot_adapter(source, self.directory / name, version, self.validator)
            if len(self._by_source) > CACHE_SIZE:
                self._by_source.clear()
            self._by_source[key] = snap
        self._last_used[snap.path] = time.time()
        try:
            self.cleanup()
        except OSError as e:  # cleaning must never stop an adapter from being served
            log.warning("snapshots: cleaning %s failed: %s", self._dir, e)
        return snap

    def locate(self, path: str | Path) -> tuple[str, str] | None:
        """(adapter name, version) of a snapshot path of this process, or None if it is not one."""
        if self._dir is None:
            return None
        try:
            parts = Path(path).relative_to(self._dir).parts
        except ValueError:
            return None
        return (parts[0], parts[2]) if len(parts) == 3 else None

    def cleanup(self, now: float | None = None) -> list[Path]:
        """Delete this process's snapshots that no name serves and that were last taken or seen in
        use more than `grace_s` ago; returns them. Unlinking is safe for what vLLM has already
        mapped (a mapping outlives the name; only truncation breaks it)."""
        with self._busy:
            return self._cleanup(now)

    def _cleanup(self, now: float | None) -> list[Path]:
        if self._dir is None or not self._dir.is_dir():
            return []
        now = time.time() if now is None else now
        try:
            in_use = {str(Path(p)) for p in self.in_use()} if self.in_use is not None else set()
        except RuntimeError:  # the mapping changed while it was read: try again next time
            return []
        removed = []
        for name_dir in self._dir.iterdir():
            for address in name_dir.iterdir() if name_dir.is_dir() else ():
                if address.name.startswith("."):
                    continue  # a copy being made
                for snap in list(address.iterdir()):
                    if str(snap) in in_use:
                        self._last_used[snap] = now
                        continue
                    last = self._last_used.get(snap)
                    if last is None:
                        last = snap.stat().st_mtime
                    if now - last <= self.grace_s:
                        continue
                    shutil.rmtree(snap, ignore_errors=True)
                    self._last_used.pop(snap, None)
                    removed.append(snap)
                with contextlib.suppress(OSError):
                    address.rmdir()  # only when empty
        if removed:
            gone = {str(p) for p in removed}
            self._by_source = {k: v for k, v in self._by_source.items() if str(v.path) not in gone}
            log.info("snapshots: removed %d that no adapter serves any more", len(removed))
        return removed
