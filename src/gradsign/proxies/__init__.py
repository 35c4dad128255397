"""Zero-cost proxies, one module each, registered by name (see ``registry``)."""
from gradsign.proxies.registry import PROXIES, ProxyInfo, UnknownProxyError, get_proxy, register

# Importing a proxy module registers it.
from gradsign.proxies import gradsign as _gradsign  # noqa: F401,E402

__all__ = ["PROXIES", "ProxyInfo", "UnknownProxyError", "get_proxy", "register"]
