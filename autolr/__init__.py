"""autolr: tune the learning rate of a running training job from the outside."""
from .control import Control
from .hookspecs import hookimpl
from .logger import Logger, init, log

__version__ = "0.1.0"
__all__ = ["Control", "Logger", "hookimpl", "init", "log", "__version__"]
