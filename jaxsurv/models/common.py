"""Parameter initialisers shared by several models.

* ``torch_linear_init``: PyTorch's default ``nn.Linear`` weight init
  (kaiming_uniform with a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  for the layers of models ported from PyTorch code (MMNN's DenseNet head and
  clinical MLP, HEALNet).
"""

from __future__ import annotations

import flax.linen as nn

# PyTorch's default ``nn.Linear`` weight init (kaiming_uniform with a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
