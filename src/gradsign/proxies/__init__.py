"""Zero-cost proxies, one module each, registered by name (see ``registry``)."""
from gradsign.proxies.registry import PROXIES, ProxyInfo, UnknownProxyError, get_proxy, register

# Importing a proxy module registers it.
from gradsign.proxies import gradsign as _gradsign  # noqa: F401,E402
from gradsign.proxies import effective_params as _effective_params  # noqa: F401,E402
from gradsign.proxies import fisher as _fisher  # noqa: F401,E402
from gradsign.proxies import flops as _flops  # noqa: F401,E402
from gradsign.proxies import grad_norm as _grad_norm  # noqa: F401,E402
from gradsign.proxies import grasp as _grasp  # noqa: F401,E402
from gradsign.proxies import jacob_cov as _jacob_cov  # noqa: F401,E402
from gradsign.proxies import naswot as _naswot  # noqa: F401,E402
from gradsign.proxies import params as _params  # noqa: F401,E402
from gradsign.proxies import snip as _snip  # noqa: F401,E402
from gradsign.proxies import synflow as _synflow  # noqa: F401,E402
from gradsign.proxies import zen as _zen  # noqa: F401,E402

__all__ = ["PROXIES", "ProxyInfo", "UnknownProxyError", "get_proxy", "register"]
