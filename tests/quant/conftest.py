import logging

import numpy as np
import pytest
import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def student_t(shape, df=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(shape, generator=g)
    chi2 = torch.distributions.Chi2(torch.tensor(float(df))).sample(torch.Size(shape)) if False else \
        (torch.randn((*shape, df), generator=g) ** 2).sum(-1)
    return normal / torch.sqrt(chi2 / df)


@pytest.fixture(scope="session")
def smollm2_weights():
    """A few real weight matrices of the embedded SmolLM2 model (float32)."""
    from qforge.model.embedded import gguf_matrices
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight"]
    return {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in gguf_matrices(names=names)}

# bitsandbytes wraps its device-independent kernels in torch.compile; compiling them for every
# shape would dominate the test time and changes no value, so the oracle runs eagerly.
torch._dynamo.config.disable = True
