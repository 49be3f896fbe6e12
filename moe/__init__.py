"""moe: a Mixture-of-Experts library and trainer for PyTorch.

Library use::

    import moe
    layer = moe.MoELayer(hidden_size=512, ffn_hidden_size=1024, num_experts=8, top_k=2)
    y = layer(x); loss = task_loss + moe.aux_loss(model)
"""

from moe import compress, losses, routers
from moe.layer import MoELayer, RoutingStats, aux_loss, moe_layers, name_moe_layers, update_routers
from moe.routing import Routing

__version__ = "0.1.0"

__all__ = [
    "MoELayer",
    "Routing",
    "RoutingStats",
    "aux_loss",
    "compress",
    "losses",
    "moe_layers",
    "name_moe_layers",
    "routers",
    "update_routers",
]
