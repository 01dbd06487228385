"""The strategy registry: names, aliases, plugins and `get()`.

Names are case-insensitive and treat `-` and `_` alike (`"Nash-MTL"` finds `nash_mtl`).
Third-party packages add strategies through the entry-point group
`lossbalance.strategies`; each entry point names a `Strategy` subclass (registered under the
entry point's name unless the class registered itself) or a module that registers on import.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import warnings

import keras

ENTRY_POINT_GROUP = "lossbalance.strategies"

_classes: dict[str, type] = {}  # canonical name -> class
_aliases: dict[str, str] = {}  # normalised name or alias -> canonical name
_plugins_loaded = False


def normalize_name(name: str) -> str:
    """The lookup key of a strategy name: lowercase, `-` and spaces read as `_`."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def register(name: str, aliases: tuple[str, ...] | list[str] = ()):
    """Class decorator that makes a `Strategy` subclass available by name.

    The class also becomes Keras-serialisable (package `lossbalance`), so a saved
    `BalancedModel` finds it again on load, with `safe_mode=True` too.

    Example:
        @lossbalance.strategies.register("my_method", aliases=("mm",))
        class MyMethod(lossbalance.strategies.GramianWeighting): ...
    """

    def decorator(cls):
        from lossbalance.strategies.base import Strategy

        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(
                f"register({name!r}) decorates Strategy subclasses; got {cls!r}."
            )
        canonical = normalize_name(name)
        for key in (canonical, *map(normalize_name, aliases)):
            owner = _aliases.get(key)
            if owner is not None and _classes[owner] is not cls:
                raise ValueError(
                    f"Strategy name {key!r} is already taken by "
                    f"{_classes[owner].__qualname__}; choose another name or alias."
                )
        _classes[canonical] = cls
        _aliases[canonical] = canonical
        for alias in aliases:
            _aliases[normalize_name(alias)] = canonical
        cls.registry_name = canonical
        keras.saving.register_keras_serializable(package="lossbalance")(cls)
        return cls

    return decorator


def _load_plugins() -> None:
    """Import the strategies that installed packages advertise, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from lossbalance.strategies.base import Strategy

    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry_point.load()
        except Exception as error:  # a broken plugin must not break the package
            warnings.warn(
                f"lossbalance: could not load strategy plugin {entry_point.name!r} "
                f"({entry_point.value}): {error}",
                stacklevel=3,
            )
            continue
        if isinstance(loaded, type) and issubclass(loaded, Strategy):
            if loaded not in _classes.values():
                register(entry_point.name)(loaded)


def available() -> list[str]:
    """Sorted canonical names of every registered strategy, plugins included."""
    _load_plugins()
    return sorted(_classes)


def aliases() -> dict[str, str]:
    """Every accepted alias mapped to its canonical name (canonical names excluded)."""
    _load_plugins()
    return {alias: name for alias, name in sorted(_aliases.items()) if alias != name}


def lookup(name: str) -> type:
    """The class registered under `name` or one of its aliases."""
    if not isinstance(name, str):
        raise TypeError(f"A strategy name must be a string; got {name!r}.")
    key = normalize_name(name)
    if key not in _aliases:
        _load_plugins()
    if key not in _aliases:
        close = difflib.get_close_matches(key, list(_aliases), n=1, cutoff=0.5)
        hint = f" Did you mean {_aliases[close[0]]!r}?" if close else ""
        raise ValueError(
            f"Unknown strategy {name!r}.{hint} Available strategies: "
            f"{', '.join(available())}. Register your own with "
            "@lossbalance.strategies.register(name)."
        )
    return _classes[_aliases[key]]


def get(identifier, **kwargs):
    """Resolve a strategy from a name, an instance, a class or a config dict.

    Args:
        identifier: a registered name (`"pcgrad"`, `"uw"`), a `Strategy` instance (returned
            as is), a `Strategy` subclass, or a dict: `{"name": "cagrad", "c": 0.5}`,
            `{"name": "cagrad", "config": {"c": 0.5}}`, or a Keras-serialised strategy.
        **kwargs: hyper-parameters for the strategy's constructor.

    Returns:
        A new `Strategy` instance (or `identifier` itself when it is one).
    """
    from lossbalance.strategies.base import Strategy

    if isinstance(identifier, Strategy):
        if kwargs:
            raise ValueError(
                "Hyper-parameters can only be given with a strategy name or class, "
                f"not with an instance; got {sorted(kwargs)} for {identifier!r}."
            )
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, Strategy):
        return identifier(**kwargs)
    if isinstance(identifier, str):
        return lookup(identifier)(**kwargs)
    if isinstance(identifier, dict):
        config = dict(identifier)
        if "class_name" in config and "config" in config:  # Keras-serialised form
            strategy = keras.saving.deserialize_keras_object(config)
            return get(strategy, **kwargs)
        if "name" not in config:
            raise ValueError(
                "A strategy config dict needs a 'name' key, e.g. "
                f"{{'name': 'cagrad', 'c': 0.5}}; got keys {sorted(config)}."
            )
        name = config.pop("name")
        params = config.pop("config", {})
        params.update(config)
        params.update(kwargs)
        return lookup(name)(**params)
    raise TypeError(
        "A strategy must be a name, a Strategy instance or class, or a config dict; "
        f"got {identifier!r} of type {type(identifier).__name__}."
    )
