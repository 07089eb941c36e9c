"""Shared test settings."""

import torch

# Tests run two pytest workers on two cores: one torch thread each avoids oversubscription,
# under which tiny tensor operations become orders of magnitude slower.
torch.set_num_threads(1)
