"""The model repository: discover models, load versions by policy, route requests, reload without restart.

A new version is loaded and warmed up before it takes traffic; versions leaving the policy are taken out
of routing first and then drained (their queued and running requests finish) before their sessions are
released. A version that fails to load is recorded with its reason and the versions already serving stay.
A serving version whose file is deleted or rewritten on disk keeps serving the copy in memory; the poll
logs it and shows it as the version's reason in RepositoryIndex and GetModel.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from ..engine.errors import InvalidInput, ModelNotFound, ModelNotReady, StartRefused, shown
from ..engine.loading import model_names
from ..engine.runtime import RuntimeOptions
from ..repository_format import (
    MODEL_FILE,
    BatchingOptions,
    ConfigError,
    ModelSpec,
    list_versions,
    load_spec,
    select_versions,
)
from .model import ModelVersion, load_version

log = logging.getLogger("serving.repository")

READY, LOADING, UNAVAILABLE, UNLOADING = "READY", "LOADING", "UNAVAILABLE", "UNLOADING"


@dataclass
class VersionStatus:
    name: str
    version: int
    state: str
    reason: str = ""
    stamp: tuple = ()  # the model file's (mtime, size) when last tried: a failed file is retried once changed


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


class ModelRepository:
    def __init__(self, root: str | os.PathLike, runtime_options: RuntimeOptions | None = None,
                 batching_defaults: BatchingOptions | None = None, batching_overrides: dict | None = None,
                 series_factory=None, tracer=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise StartRefused(f"model repository {self.root} is not a directory")
        self.runtime_options = runtime_options or RuntimeOptions()
        self.batching_defaults = batching_defaults or BatchingOptions()
        self.batching_overrides = batching_overrides or {}
        self._series_factory = series_factory  # (model, version) -> its Prometheus series (statistics.SeriesSink)
        self._tracer = tracer  # the batchers' tracer hook (spans of queue waits and batches)
        self._ready: dict[str, dict[int, ModelVersion]] = {}
        self._status: dict[tuple[str, int], VersionStatus] = {}
        self._model_errors: dict[str, str] = {}
        self._unloaded_by_request: set[str] = set()
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self._names: list[str] = []  # the model directories as last scanned (at load, unload and each poll)
        # Called (awaited) after every load, unload and poll: the server brings its health in line.
        self.on_change: Callable[[], Awaitable[None]] | None = None
        self.default_model = ""  # the model of a request that names none ("": the only one, if only one)

    # -- queries ---------------------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """Every model directory in the repository, loaded or not, read from disk now (and remembered)."""
        self._names = model_names(self.root)
        return self._names

    def readiness(self) -> tuple[bool, str]:
        """Strict readiness: True when every model the server is meant to serve (each model directory, less
        those unloaded on request) has a ready version, and there is at least one; else False and why."""
        expected = [n for n in self._names if n not in self._unloaded_by_request]
        if not expected:
            why = "every model was unloaded on request" if self._names else f"the repository {self.root} holds no model"
            return False, f"no model to serve: {why}"
        missing = [n for n in expected if not self._ready.get(n)]
        if missing:
            details = "; ".join(f"{n}: {self._why_not_ready(n)}" for n in missing[:3])
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            return False, f"{len(missing)} of {len(expected)} model(s) have no ready version: {details}{more}"
        return True, ""

    def _why_not_ready(self, name: str) -> str:
        return self._model_errors.get(name) or "; ".join(
            f"version {s.version}: {s.state} {s.reason}".strip() for s in self.statuses(name)) or "not loaded"

    def unloaded_on_request(self) -> set[str]:
        return set(self._unloaded_by_request)

    def ready_versions(self, name: str) -> list[int]:
        return sorted(self._ready.get(name, {}), reverse=True)

    def get(self, name: str, version: int = 0) -> ModelVersion:
        """The version to serve: the given one, or the newest ready one when version is 0."""
        versions = self._ready.get(name)
        if not versions:
            if name not in self._names:
                known = ", ".join(self._names) or "none"
                raise ModelNotFound(f"model {shown(name)} is not in the repository (models: {known})")
            raise ModelNotReady(f"model {shown(name)} has no ready version ({self._why_not_ready(name)})")
        if version:
            if version not in versions:
                raise ModelNotFound(f"model {shown(name)} has no ready version {version} "
                                    f"(ready: {', '.join(map(str, sorted(versions)))})")
            return versions[version]
        return versions[max(versions)]

    def resolve(self, name: str, version: int) -> ModelVersion:
        """A request's model: the named one (or the only one when none is named) at the version asked
        (0: the newest ready)."""
        if not name and self.default_model:  # `serve --default-model`: the one a request without a name gets
            name = self.default_model
        if not name:
            if len(self._names) != 1:
                raise InvalidInput(f"request names no model; choose one of: {', '.join(self._names)} (or start the "
                                   f"server with --default-model)")
            name = self._names[0]
        if version < 0:
            raise InvalidInput(f"version {version} is negative; use 0 for the latest")
        return self.get(name, version)

    def all_ready(self) -> list[ModelVersion]:
        return [mv for versions in self._ready.values() for mv in versions.values()]

    def statuses(self, name: str | None = None) -> list[VersionStatus]:
        return sorted((s for s in self._status.values() if name is None or s.name == name),
                      key=lambda s: (s.name, s.version))

    def model_error(self, name: str) -> str:
        return self._model_errors.get(name, "")

    # -- loading ---------------------------------------------------------------------------------------
    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    async def load_all(self, unloaded: Collection[str] = ()) -> None:
        """Load every model in the repository but those `unloaded` (on request, before this process started:
        a replaced worker of `serve --workers N` starts as its siblings are)."""
        for name in self.model_names():
            if name in unloaded:
                self._unloaded_by_request.add(name)
            else:
                await self.load(name)
        await self._changed()

    async def load(self, name: str) -> None:
        """(Re)load a model: bring its ready versions in line with its version policy."""
        async with self._lock:
            self.model_names()
            self._unloaded_by_request.discard(name)
            await self._sync_model(name, force=True)
        await self._changed()

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._ready and name not in self.model_names():
                raise ModelNotFound(f"model {shown(name)} is not in the repository")
            self._unloaded_by_request.add(name)
            for version in list(self._ready.get(name, {})):
                await self._retire(name, version, "unloaded by request")
            self._ready.pop(name, None)
        await self._changed()

    async def _sync_model(self, name: str, force: bool = False) -> None:
        model_dir = self.root / name
        try:
            spec = load_spec(model_dir, self.batching_defaults, self.batching_overrides)
            wanted = select_versions(spec.config, list_versions(model_dir))
            self._model_errors.pop(name, None)
        except (ConfigError, OSError, ValueError) as e:
            self._model_errors[name] = str(e)
            if force:
                log.error("model %s: %s", name, e)
            return
        current = self._ready.setdefault(name, {})
        for version in wanted:
            if version in current:
                continue
            status = self._status.get((name, version))
            try:
                stamp = _stamp(model_dir / str(version) / MODEL_FILE)
            except FileNotFoundError:
                continue  # removed since it was listed: the next poll sees the directory as it is then
            if status and status.state == UNAVAILABLE and status.stamp == stamp and not force:
                continue  # failed before and unchanged since
            await self._load_version(spec, version, stamp)
        ready_wanted = [v for v in wanted if v in current]
        for version in list(current):
            # A version leaves only once something newer serves, so a broken new file never empties a model.
            if version not in wanted and ready_wanted:
                await self._retire(name, version, "not in the version policy any more")
        self._note_disk_changes(name, model_dir)

    def _note_disk_changes(self, name: str, model_dir: Path) -> None:
        """A serving version's file deleted or rewritten on disk: the loaded copy keeps serving (its sessions
        hold the model in memory), and the change is logged once and shown as the version's reason."""
        for version in self._ready.get(name, {}):
            status = self._status.get((name, version))
            if status is None or status.state != READY:
                continue
            try:
                changed = _stamp(model_dir / str(version) / MODEL_FILE) != status.stamp
                note = ("model file changed on disk after loading; the loaded copy keeps serving (write new weights "
                        "as a new version directory)") if changed else ""
            except OSError:
                note = ("model file is gone from disk; the loaded copy keeps serving until a newer version is "
                        "ready (or until a restart)")
            if note != status.reason:
                if note:
                    log.warning("model %s version %d: %s", name, version, note)
                else:
                    log.info("model %s version %d: model file back as loaded", name, version)
                status.reason = note

    async def _load_version(self, spec: ModelSpec, version: int, stamp: tuple) -> None:
        key = (spec.name, version)
        self._status[key] = VersionStatus(spec.name, version, LOADING, stamp=stamp)
        series = self._series_factory(spec.name, version) if self._series_factory else None
        try:
            mv = await asyncio.to_thread(load_version, spec, version, self.runtime_options, series,
                                    self._tracer)
            await mv.batcher.start()
        except Exception as e:  # noqa: BLE001 - any failure leaves the serving versions untouched
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            self._status[key] = VersionStatus(spec.name, version, UNAVAILABLE, reason, stamp)
            # The one line says why; the traceback under it says where (a bug in a model file or in the server).
            log.error("model %s version %d failed to load: %s", spec.name, version, reason, exc_info=e)
            return
        self._ready.setdefault(spec.name, {})[version] = mv
        self._status[key] = VersionStatus(spec.name, version, READY, stamp=stamp)
        log.info("model %s version %d ready on %s", spec.name, version, mv.sessions.provider)
        for warning in spec.warnings:  # what of its config.pbtxt is not applied, by name
            log.warning("model %s version %d: config.pbtxt %s", spec.name, version, warning)

    async def _retire(self, name: str, version: int, reason: str, drain: bool = True) -> None:
        mv = self._ready.get(name, {}).pop(version, None)
        if mv is None:
            return
        self._status[(name, version)] = VersionStatus(name, version, UNLOADING, reason)
        await mv.batcher.stop(drain=drain)
        mv.sessions.sessions.clear()
        del mv
        gc.collect()
        self._status[(name, version)] = VersionStatus(name, version, UNAVAILABLE, reason)
        log.info("model %s version %d unloaded (%s)", name, version, reason)

    # -- polling ---------------------------------------------------------------------------------------
    async def poll_once(self) -> None:
        async with self._lock:
            present = set(self.model_names())
            for name in sorted(present - self._unloaded_by_request):
                await self._sync_model(name)
            for name in list(self._ready):
                if name not in present:
                    for version in list(self._ready[name]):
                        await self._retire(name, version, "removed from the repository")
                    self._ready.pop(name, None)
        await self._changed()

    def start_polling(self, interval_s: float, then: Callable[[], Awaitable[None]] | None = None) -> None:
        """Scan every `interval_s`; `then` is awaited after each scan (the other workers scan in turn)."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.poll_once()
                    if then is not None:
                        await then()
                except Exception:  # noqa: BLE001 - keep polling whatever one scan met
                    log.exception("repository poll failed")

        self._poller = asyncio.create_task(loop(), name="repository-poll")

    def stop_polling(self) -> None:
        if self._poller:
            self._poller.cancel()
            self._poller = None

    async def close(self, drain: bool = True) -> None:
        """Unload every version; with drain, what their batchers hold is answered first."""
        self.stop_polling()
        for name in list(self._ready):
            for version in list(self._ready[name]):
                await self._retire(name, version, "server shutting down", drain=drain)
