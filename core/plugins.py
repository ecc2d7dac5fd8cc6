"""Plugin manager: loads entry points of the ``rlm`` group once and builds one registry per kind.

``RLM_LOAD_PLUGINS``: comma-separated distribution names; when set, only those distributions' entry points
load (``rlm`` is the distribution holding the built-ins). ``RLM_DISABLE_PLUGINS``: comma-separated plugin
(entry-point) or distribution names to skip. A plugin whose import or registration raises is recorded with
its error and skipped, so the rest of rlm keeps working.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from rlm.core import hookspecs
from rlm.core.errors import DuplicatePluginError, UnknownPluginError

GROUP = hookspecs.PROJECT

# kind -> (hook name, singular noun used in messages)
KINDS: dict[str, tuple[str, str]] = {
    "trainers": ("register_trainers", "trainer"),
    "merge_methods": ("register_merge_methods", "merge method"),
    "tasks": ("register_tasks", "task"),
    "metrics": ("register_metrics", "metric"),
    "generation_backends": ("register_generation_backends", "generation backend"),
}

KIND_ALIASES = {
    "trainer": "trainers", "trainers": "trainers",
    "merge_method": "merge_methods", "merge_methods": "merge_methods", "merge-method": "merge_methods",
    "merger": "merge_methods", "mergers": "merge_methods", "method": "merge_methods",
    "task": "tasks", "tasks": "tasks",
    "metric": "metrics", "metrics": "metrics",
    "generation_backend": "generation_backends", "generation_backends": "generation_backends",
    "generation-backend": "generation_backends", "backend": "generation_backends", "backends": "generation_backends",
}


@dataclass
class PluginInfo:
    """What ``rlm plugins --json`` reports for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    registered: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "registered": list(self.registered), "error": self.error}


@dataclass
class _Entry:
    obj: Any
    plugin: str
    canonical: str


class Registry:
    """Name -> class for one kind of plugin, with aliases and "did you mean" errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.noun = KINDS[kind][1]
        self._entries: dict[str, _Entry] = {}
        self._canonical: list[str] = []

    def add(self, obj: Any, plugin: str, name: str | None = None, aliases: Iterable[str] = ()) -> str:
        canonical = name or getattr(obj, "name", None) or getattr(obj, "__name__", None)
        if not canonical:
            raise DuplicatePluginError(f"plugin {plugin!r} registered a {self.noun} without a name")
        names = [canonical, *aliases, *getattr(obj, "aliases", ())]
        for n in dict.fromkeys(names):
            if n in self._entries and self._entries[n].obj is not obj:
                other = self._entries[n].plugin
                raise DuplicatePluginError(
                    f"{self.noun} {n!r} is registered by two plugins: {other!r} and {plugin!r}; "
                    f"disable one with RLM_DISABLE_PLUGINS")
            self._entries[n] = _Entry(obj, plugin, canonical)
        if canonical not in self._canonical:
            self._canonical.append(canonical)
        return canonical

    def names(self) -> list[str]:
        """Canonical names in registration order (aliases excluded)."""
        return list(self._canonical)

    def defaults(self) -> list[str]:
        """Canonical names of the plugins that declare ``default = True``, in registration order."""
        return [n for n in self._canonical if getattr(self._entries[n].obj, "default", False)]

    def all_names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._canonical)

    def get(self, name: str) -> Any:
        """Return the class registered as ``name``; an unknown name lists the closest registered ones."""
        try:
            return self._entries[name].obj
        except KeyError:
            close = difflib.get_close_matches(name, self.all_names(), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(self.names())) or "none"
            raise UnknownPluginError(f"unknown {self.noun} {name!r}{hint} (registered: {known})") from None


def _split_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _format_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class PluginSystem:
    """One pluggy manager plus the registries built from it. ``rlm.core.plugins.get_system()`` holds the
    process-wide instance; tests build their own with ``load_entry_points=False`` and ``add_plugin``."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._registries: dict[str, Registry] | None = None
        if load_entry_points:
            self._load_entry_points()

    # -- loading -----------------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        only = _split_env("RLM_LOAD_PLUGINS")
        disabled = _split_env("RLM_DISABLE_PLUGINS") or set()
        seen: set[tuple[str, str]] = set()
        for ep in md.entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if (ep.name, ep.value) in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add((ep.name, ep.value))
            if only is not None and dist not in only:
                continue
            if ep.name in disabled or (dist is not None and dist in disabled):
                continue
            info = PluginInfo(name=ep.name, distribution=dist, version=version)
            if ep.name in self.infos:
                prev = self.infos[ep.name]
                info.error = (f"plugin name {ep.name!r} is used by both {prev.distribution!r} and {dist!r}; "
                              f"this one was skipped")
                self.infos[f"{dist}:{ep.name}"] = info
                continue
            self.infos[ep.name] = info
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not break the CLI
                info.error = _format_error(exc)
                continue
            try:
                self.pm.register(module, name=ep.name)
            except Exception as exc:
                info.error = _format_error(exc)

    def add_plugin(self, plugin: Any, name: str, distribution: str | None = None, version: str | None = None) -> None:
        """Register an in-process plugin object (tests, notebooks)."""
        self.pm.register(plugin, name=name)
        self.infos[name] = PluginInfo(name=name, distribution=distribution, version=version)
        self._registries = None

    # -- registries --------------------------------------------------------------------------------------
    def _build(self) -> dict[str, Registry]:
        registries = {kind: Registry(kind) for kind in KINDS}
        for info in self.infos.values():
            info.registered = []
        for kind, (hook_name, _) in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            # get_hookimpls() lists plugins in registration order (entry points: sorted by name)
            for impl in caller.get_hookimpls():
                plugin_name = impl.plugin_name
                info = self.infos.get(plugin_name)
                if info is not None and info.error:
                    continue
                added: list[str] = []

                def register(cls: Any, *, name: str | None = None, aliases: Iterable[str] = (),
                             _reg: Registry = registries[kind], _plugin: str = plugin_name,
                             _added: list[str] = added) -> None:
                    _added.append(_reg.add(cls, _plugin, name=name, aliases=aliases))

                try:
                    impl.function(register=register)
                except DuplicatePluginError:
                    raise
                except Exception as exc:
                    if info is not None:
                        info.error = f"{hook_name}: {_format_error(exc)}"
                    continue
                if info is not None:
                    info.registered.extend(added)
        return registries

    @property
    def registries(self) -> dict[str, Registry]:
        if self._registries is None:
            self._registries = self._build()
        return self._registries

    def registry(self, kind: str) -> Registry:
        key = KIND_ALIASES.get(kind)
        if key is None:
            close = difflib.get_close_matches(kind, list(KIND_ALIASES), n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownPluginError(f"unknown plugin kind {kind!r}{hint} (kinds: trainer, merge_method, task, metric, generation_backend)")
        return self.registries[key]

    def plugin_infos(self) -> list[PluginInfo]:
        self.registries  # fills ``registered``
        return list(self.infos.values())

    def register_commands(self, app: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.infos.get(impl.plugin_name)
            try:
                impl.function(app=app)
            except Exception as exc:
                if info is not None:
                    info.error = f"register_commands: {_format_error(exc)}"
                else:
                    print(f"rlm: plugin {impl.plugin_name!r} failed to add commands: {exc}", file=sys.stderr)

    def as_json(self) -> dict[str, Any]:
        return {**{kind: reg.names() for kind, reg in self.registries.items()},
                "plugins": [i.as_dict() for i in self.plugin_infos()]}


_SYSTEM: PluginSystem | None = None


def get_system() -> PluginSystem:
    """The process-wide plugin system; entry points are loaded on first use, once."""
    global _SYSTEM
    if _SYSTEM is None:
        _SYSTEM = PluginSystem()
    return _SYSTEM


def reset_system(system: PluginSystem | None = None) -> None:
    """Replace (or drop, to reload lazily) the process-wide plugin system."""
    global _SYSTEM
    _SYSTEM = system


def registry(kind: str) -> Registry:
    return get_system().registry(kind)


def get_plugin(kind: str, name: str) -> Any:
    """Look up a plugin class by kind (``trainer``, ``merge_method``, ``task``, ``metric``,
    ``generation_backend``) and name."""
    return get_system().registry(kind).get(name)


def make_task(name: str, overrides: Any = None, source: str | None = None) -> Any:
    """The task plugin ``name`` with config ``overrides`` (a mapping), validated first so that a bad field is
    named with ``source`` (default: ``config of task 'NAME'``)."""
    from rlm.core.config import validate

    cls = get_plugin("task", name)
    return cls(validate(cls.Config, dict(overrides or {}), source or f"config of task {name!r}"))
