"""rlm core: plugin system, configs, CLI and the engines every plugin of a kind shares.

``rlm.core`` never imports ``rlm.plugins``: built-ins reach the core only through entry points.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
