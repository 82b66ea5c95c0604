"""The custom ops (namespace ``lossfuse``) and their autograd Functions, one module per loss."""

from .. import _backend
from . import cross_entropy  # noqa: F401
from . import linear_cross_entropy  # noqa: F401  (built on the cross_entropy ops)
from . import huber  # noqa: F401
from . import focal  # noqa: F401
from . import distillation  # noqa: F401
from . import kl_div  # noqa: F401
from . import linear_distillation  # noqa: F401  (built on the distillation ops)

# After every schema is defined: the extension's CPU kernels register against them.
_backend.load_extension()
