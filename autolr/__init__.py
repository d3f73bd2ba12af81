"""autolr: tune the learning rate of a running training job from the outside."""
from .control import Control
from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["Control", "hookimpl", "__version__"]
