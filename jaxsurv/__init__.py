"""jaxsurv: multimodal survival prediction in JAX/Flax.

Risk convention used everywhere: a higher risk score means a higher hazard,
i.e. an earlier expected event.
"""

__version__ = "0.1.0"
