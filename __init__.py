"""saestrata: a two-stage cached-activation pipeline for SAE research on Gemma models.

Data flows one way: ``harvest -> store -> train -> evaluate`` (see DESIGN.md).
"""

__version__ = "0.1.0"
