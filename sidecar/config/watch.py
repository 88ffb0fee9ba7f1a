"""Hot reload: SIGHUP or a change of the file (including a Kubernetes ConfigMap's symlink
swap) builds a new rule set off the event loop and swaps it in; a bad file keeps the old."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from sidecar.config.loader import ConfigError, load_config
from sidecar.config.ruleset import RuleSet, RuleSetHolder, build_ruleset
from sidecar.metrics import RELOADS

log = structlog.get_logger("sidecar.config")


def _fingerprint(path: Path) -> tuple[int, int, int, str] | None:
    """What changes when the file does: the resolved file's identity and the link target
    (a ConfigMap update swaps a `..data` symlink; the path itself never changes)."""
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns, st.st_size, str(path.resolve())
    except OSError:
        return None


def _build(path: Path) -> RuleSet:
    text = path.read_text(encoding="utf-8")
    return build_ruleset(load_config(path), source_text=text, source=str(path))


class ConfigWatcher:
    def __init__(
        self,
        path: Path,
        holder: RuleSetHolder,
        interval: float = 0.5,
        before_swap: Callable[[RuleSet], Awaitable[None]] | None = None,
    ) -> None:
        self.path = path
        self._before_swap = before_swap
        self.holder = holder
        self.interval = interval
        self._seen = _fingerprint(path)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def reload(self, reason: str = "signal") -> bool:
        async with self._lock:
            self._seen = _fingerprint(self.path)
            try:
                # Building prices and rules takes a while: never on the event loop.
                ruleset = await asyncio.to_thread(_build, self.path)
            except (ConfigError, OSError, ValueError) as exc:
                message = "\n".join(exc.errors) if isinstance(exc, ConfigError) else str(exc)
                self.holder.last_error = message
                RELOADS.labels("error").inc()
                log.error(
                    "config_reload_failed",
                    path=str(self.path),
                    reason=reason,
                    error=message,
                    serving=self.holder.current.version,
                )
                return False
            if ruleset.version == self.holder.current.version:
                self.holder.last_error = None
                return True
            if self._before_swap is not None:
                try:
                    await self._before_swap(ruleset)
                except Exception as exc:  # seeding is best effort; the new policy must apply
                    log.warning("config_before_swap_failed", error=str(exc))
            self.holder.swap(ruleset)
            RELOADS.labels("ok").inc()
            log.info("config_reloaded", path=str(self.path), reason=reason, version=ruleset.version)
            return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            current = _fingerprint(self.path)
            if current is not None and current != self._seen:
                await self.reload("file_changed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def on_signal(self) -> None:
        asyncio.get_running_loop().create_task(self.reload("sighup"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
