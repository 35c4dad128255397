"""gradsign: predict a network's trained accuracy before training (GradSign and other zero-cost
proxies) and use it to speed up neural architecture search."""
from gradsign.api import available_proxies, proxy_info, score, scores
from gradsign.rank import rank  # the function; "from gradsign.rank import RankResult" still reads the module

__version__ = "0.1.0"

__all__ = ["available_proxies", "proxy_info", "rank", "score", "scores", "__version__"]
